"""The PyTorch backend on CUDA: Triton kernels over GGUF blocks, the decode step as a CUDA graph."""
