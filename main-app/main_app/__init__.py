"""main-app: orchestrates VAD, STT, LLM and TTS into a realtime voice conversation."""
