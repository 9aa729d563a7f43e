"""Exports of a finished model: GGUF conversion and llama.cpp quantization, LoRA adapters as GGUF, packing."""
