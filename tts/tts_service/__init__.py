"""TTS service: piper over REST, OpenAI-compatible REST and WebSocket."""
