"""PolyakSGD, NesterovSGD and their functional kernels."""
