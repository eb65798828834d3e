"""Triton kernels of fastweight, installed as ``fastweight.kernels``."""
