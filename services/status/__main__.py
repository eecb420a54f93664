"""status: folds status events into the ledger, publishes the latest state per command."""
from dercmd.settings import StatusSettings, get_settings

from .app import build

build(get_settings(StatusSettings)).run()
