"""ocpp_gateway: the OCPP 1.6J central system charge points connect to."""
from dercmd.settings import OcppGatewaySettings, get_settings

from .app import build

build(get_settings(OcppGatewaySettings)).run()
