"""torch-momentum: heavy-ball and Nesterov momentum in velocity form, and Clarke subgradients.

The core package depends on torch only; the Lightning integration lives in
:mod:`torch_momentum.callbacks` (optional extra ``[lightning]``).
"""

from torch_momentum.clarke import ClarkeSubgradient, clarke_subgradient
from torch_momentum.optim import NesterovSGD, PolyakSGD, to_sgd_state_dict
from torch_momentum.stationarity import StationarityProfile, stationarity_profile

__all__ = [
    "ClarkeSubgradient",
    "NesterovSGD",
    "PolyakSGD",
    "StationarityProfile",
    "clarke_subgradient",
    "stationarity_profile",
    "to_sgd_state_dict",
]
__version__ = "0.1.0"
