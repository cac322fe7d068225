"""The model pool: roles, backends (llama.cpp, Ollama, OpenAI-compatible),
routing, health, fallback and the repetition guard."""
