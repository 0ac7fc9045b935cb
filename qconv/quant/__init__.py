"""Quantization algorithms used by qconv (pure array-in / array-out functions, no I/O)."""
