"""arbitration: cooldown and slot rules, atomically in Redis; emits dispatch orders."""
from dercmd.settings import get_settings

from .app import build

build(get_settings()).run()
