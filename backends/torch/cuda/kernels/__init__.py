"""Triton kernels of the CUDA backend; all of them also run under TRITON_INTERPRET=1."""
