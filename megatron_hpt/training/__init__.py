"""Training: the step inside Megatron's forward_backward_func, vocab-parallel log-probs, optimizer,
checkpoints. One of the two packages (with models/) that import megatron."""
