"""ocpp_gateway: the OCPP 1.6J central system. Charge points hold their WebSockets here; dispatch's
``ocpp`` backend asks the replica holding a charge point to call it (see docs/protocols.md,
"OCPP 1.6J")."""
