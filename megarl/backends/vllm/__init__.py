"""The vLLM inference backend (the only package that imports vllm)."""
