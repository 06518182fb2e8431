"""Pure math on tensors: every function takes ``reduction`` (``'none'`` first)
and ``sample_weight`` and owns no parameters."""
