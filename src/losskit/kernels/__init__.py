"""Autograd Functions shared by heads and losses (chunked log-sum-exp, the
fused margin cross-entropy, Multi-Similarity blocks) and their numeric
constants, each defined once (``kernels.constants``)."""
