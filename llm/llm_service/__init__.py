"""LLM service: Ollama, any OpenAI-compatible server, or an embedded llama.cpp model."""
