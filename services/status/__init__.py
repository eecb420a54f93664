"""status: folds status events into the ledger, publishes the latest state per command."""
