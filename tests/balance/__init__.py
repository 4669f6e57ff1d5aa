"""The plain-torch balance arithmetic of ``torch_momentum.balance``."""
