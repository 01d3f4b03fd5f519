"""Text: tokenizers built from GGUF vocabularies, streaming detokenization, sandboxed chat templates."""
