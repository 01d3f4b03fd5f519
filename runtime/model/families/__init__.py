"""Model families: one table per weight source, GGUF metadata (gguf) and Hugging Face config.json (hf)."""
