"""meshd: pool the GPUs of many machines into one mesh for LLM inference."""

__version__ = "0.1.0"
