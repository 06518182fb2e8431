"""Numeric constants shared by every kernel; defined here only."""

#: the eps of torch.nn.functional.normalize: ||x|| is clamped to at least this
NORM_EPS = 1e-12
#: log2(e): exp(x) == exp2(x * LOG2E)
LOG2E = 1.4426950408889634
#: ln(2): log(x) == log2(x) * LN2
LN2 = 0.6931471805599453
#: a row sum of exponentials below this (relative to the fixed reference) is recomputed with its own max
UNDERFLOW = 1e-25
#: up to this softmax scale the fixed reference exp(s * (cos - 1)) cannot overflow (cos <= 1)
FIXED_REF_MAX_SCALE = 80.0
