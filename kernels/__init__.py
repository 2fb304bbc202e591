"""Triton kernels of pyprefopt, installed as `pyprefopt.kernels`. Importing this package imports triton."""
