"""LoRA fine-tuning: data, the training loop, checkpoints and adapter files (see
docs/ARCHITECTURE.md, "Fine-tuning")."""
