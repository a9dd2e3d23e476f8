from voice_common.app import run

from .app import create_app
from .settings import LlmSettings

settings = LlmSettings()
run(create_app(settings), settings)
