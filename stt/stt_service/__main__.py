from voice_common.app import run

from .app import create_app
from .settings import SttSettings

settings = SttSettings()
run(create_app(settings), settings)
