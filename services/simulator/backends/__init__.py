"""The simulated backends, one module each, every one registering itself with
:func:`~dercmd.simulator.registry.simulates`: every module here is imported once, so the
simulator's app knows none of them by name. To add one, copy ``native_window.py``: serve the
protocol of :mod:`dercmd.protocols.<name>` on a :class:`~dercmd.simulator.backend.SimBackend`
(or anything with ``router``, ``by_entity``, ``start`` and ``aclose``), and register its
factory under the backend's name."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
