from dercmd.settings import get_settings
from dercmd.streams import run_worker

from .app import build

run_worker(build(get_settings()))
