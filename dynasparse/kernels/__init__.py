"""Kernels behind the dynasparse ops: a plain-torch reference beside each Triton kernel."""
