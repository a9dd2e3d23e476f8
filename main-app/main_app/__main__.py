from voice_common.app import run

from .app import create_app
from .settings import AppSettings

settings = AppSettings()
run(create_app(settings), settings)
