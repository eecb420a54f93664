"""dispatch: delivers dispatch orders through device backends; emits Sent/Succeeded/Failed."""
from dercmd.settings import DispatchSettings, get_settings

from .app import build

build(get_settings(DispatchSettings)).run()
