"""loraserve: an OpenAI-compatible multi-LoRA server on vLLM."""
