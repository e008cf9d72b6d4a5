"""credproxy: a local reverse proxy that rotates OpenAI API keys and ChatGPT/Codex accounts."""

__version__ = "0.1.0"
