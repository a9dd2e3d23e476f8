"""VAD service: silero-vad over REST and WebSocket."""
