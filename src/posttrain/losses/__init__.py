"""Loss functions: pure functions of tensors (no models, no I/O), each tested against hand-computed values."""
