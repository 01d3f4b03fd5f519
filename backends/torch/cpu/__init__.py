"""The PyTorch backend on the CPU: numba kernels over GGUF blocks, thread configuration."""
