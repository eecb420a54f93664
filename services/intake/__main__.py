"""intake: REST API and requests-topic consumer; validation, auth, compatibility; writes Pending."""
from dercmd.settings import IntakeSettings, get_settings

from .api import build

build(get_settings(IntakeSettings)).run()
