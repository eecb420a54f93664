from dercmd.settings import SimulatorSettings, get_settings
from dercmd.web import serve

from .app import create_app

settings = get_settings(SimulatorSettings)
serve("simulator", create_app(settings), settings, settings.simulator_port)
