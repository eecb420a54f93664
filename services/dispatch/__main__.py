"""dispatch: delivers dispatch orders through device backends; emits Sent/Succeeded/Failed."""
from dercmd.settings import get_settings

from .app import build

build(get_settings()).run()
