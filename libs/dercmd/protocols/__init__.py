"""Clients and wire models of the device-side protocols. They know nothing of Kafka, Redis or
the ledger: dispatch's backends map commands onto them, the simulator serves them."""
