"""Lightning integration for torch-momentum (installed as ``torch_momentum.callbacks``)."""
