from voice_common.app import run

from .app import create_app
from .settings import VadSettings

settings = VadSettings()
run(create_app(settings), settings)
