"""The Redis state: every key, hash field and Lua script dercmd keeps in Redis lives in this
package, and nothing outside it names one (``tests/unit/test_state_ownership.py`` checks).
Each module owns one kind of state and hands out typed values; its docstring lists its keys,
their fields, who writes and who reads. A script is a ``.lua`` file beside the module that
runs it (:func:`dercmd.state.scripts.source`).

=====================  ===========================================  ========================  ====================
module                 keys                                         written by                read by
=====================  ===========================================  ========================  ====================
:mod:`.slots`          ``dercmd:{e}:slots``,                        arbitration (slots.lua),  arbitration, intake
                       ``dercmd:{e}:decision:<c>``                  dispatch's claim,         (cooldown), dispatch
                                                                    intake (abort)            (``active_fence``)
:mod:`.due`            ``dercmd:due:{NN}``                          arbitration               arbitration
:mod:`.delivery`       ``dercmd:{e}:delivery:<c>``; the slots'      dispatch (delivery.lua)   dispatch, OCPP
                       ``delivered``, ``held``, ``held_before``                               gateway
:mod:`.rates`          ``dercmd:rate:{backend}``                    dispatch                  dispatch
:mod:`.ev_pending`     ``dercmd:{ev-aggregator}:pending``,          dispatch (ev-aggregator)  dispatch
                       ``dercmd:{ev-aggregator}:pending-until``
:mod:`.ocpp`           ``dercmd:{e}:ocpp:link|seen|tx|txseq``,      OCPP gateway              OCPP gateway,
                       ``dercmd:{e}:ocpp:cmd|tag|stop:<id>``                                  dispatch (ocpp)
:mod:`.webhooks`       ``dercmd:{<backend>}:webhook:<id>``          dispatch (ev-aggregator)  dispatch
:mod:`.leases`         ``dercmd:sweeper``                           status (sweeper)          status (sweeper)
:mod:`.idempotency`    ``dercmd:idempotency:{caller}:<key hash>``   intake (idempotency.lua)  intake
=====================  ===========================================  ========================  ====================

:mod:`.keys` holds the key names more than one module builds and the two constants callers
outside may use (``CALL_TIMEOUT_S``, ``STATE_TTL_S``); :mod:`.scripts` runs scripts many at a
time in one round trip; :mod:`.testing` writes state as another writer would, for tests only.
"""
