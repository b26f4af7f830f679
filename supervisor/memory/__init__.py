"""GGUF headers and the memory model: what a model needs per device, before it is loaded."""
