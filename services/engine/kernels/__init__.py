"""Device kernels the backends call: pdserve's CPU decode kernels (C, AVX-512; cpu.py builds and
loads them) and the Triton kernels for CUDA (triton_attention.py, triton_fused.py)."""
