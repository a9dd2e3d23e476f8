"""STT service: faster-whisper over REST, OpenAI-compatible REST and WebSocket."""
