from dercmd.settings import get_settings
from dercmd.web import serve

from .api import create_app

settings = get_settings()
serve("intake", create_app(settings), settings, settings.api_port)
