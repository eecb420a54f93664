"""dercmd: commands to fleets of distributed energy resources.

This package holds what the services share (events, topics, settings, Kafka/Redis/ledger
plumbing, metrics, the fleet, protocol clients, the launcher); each service is a subpackage
living in ``services/<name>`` (``dercmd.intake``, ``dercmd.arbitration``, ...).
"""
