"""Inference: the engine (graph + cache), KV caches, sampling, the generation loop, memory planning."""
