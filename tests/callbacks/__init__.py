"""The Lightning callbacks of ``torch_momentum.callbacks``."""
