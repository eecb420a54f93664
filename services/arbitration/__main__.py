"""arbitration: cooldown and slot rules, atomically in Redis; emits dispatch orders."""
from dercmd.settings import ArbitrationSettings, get_settings

from .app import build

build(get_settings(ArbitrationSettings)).run()
