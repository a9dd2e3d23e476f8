from voice_common.app import run

from .app import create_app
from .settings import TtsSettings

settings = TtsSettings()
run(create_app(settings), settings)
