r"""Balance arithmetic in plain torch: layer norms, per-unit balance and the balance ledger.

Nothing here imports Lightning: every function takes modules, parameters or tensors and returns
tensors or floats, so it can be called from any training loop; the Lightning callback
:class:`~torch_momentum.callbacks.LayerBalanceMonitor` only calls it.

The mathematics (Du, Hu & Lee 2018). Let a network be 1-homogeneous in each layer's weights
:math:`W_h` (bias-free linear, ReLU or leaky-ReLU layers): scaling :math:`W_h` by
:math:`\alpha > 0` scales the output by :math:`\alpha`. Euler's identity for homogeneous functions
then gives, for every layer,

.. math::
    \langle \nabla_{W_h} \ell, W_h \rangle = \langle \nabla_{\hat y} \ell, \hat y \rangle ,

the same number for all :math:`h`. Hence under gradient flow
:math:`\tfrac{d}{dt}\|W_h\|^2 = -2\langle \nabla_{W_h}\ell, W_h\rangle` is the same for every layer
and :math:`\|W_h(t)\|^2 - \|W_{h'}(t)\|^2` is conserved. One gradient-descent step
:math:`W_h \leftarrow W_h - \eta g_h` changes it by exactly

.. math::
    \Delta\big(\|W_h\|^2 - \|W_{h'}\|^2\big) = \eta^2 \big(\|g_h\|^2 - \|g_{h'}\|^2\big),

because the cross terms :math:`-2\eta\langle g_h, W_h\rangle` cancel between the two layers. With
biases the per-unit identity is :math:`\langle g_{W_h}, W_h\rangle + \langle g_{b_h}, b_h\rangle =
\langle g_{W_{h+1}}, W_{h+1}\rangle`: the conserved quantity is
:math:`\|W_h\|^2 + \|b_h\|^2 - \|W_{h+1}\|^2` (the bias of layer :math:`h+1` is not part of it).

Sharded parameters. A :class:`~torch.distributed.tensor.DTensor` (FSDP2 ``fully_shard``, tensor
parallelism) contributes the squared norm of its local shard; those contributions are summed over
ranks by one ``all_reduce`` of the vector of per-layer values, so every rank must call the
function with the same layers on the same steps. A rank whose shard is replicated on ``k`` ranks
weights its contribution by ``1/k``, so replicated mesh dimensions are not counted twice. Plain
tensors are assumed replicated (DDP) and are not reduced.

Layout, one topic a module (every public name is also importable from here):

- :mod:`~torch_momentum.balance.layers`: which parameters form a layer, and adjacency.
- :mod:`~torch_momentum.balance.norms`: squared norms of many layers in one pass, the metrics.
- :mod:`~torch_momentum.balance.units`: hidden units paired with their incoming and outgoing
  weights, per-unit balance and symmetry.
- :mod:`~torch_momentum.balance.rules`: one object per optimiser family, how its step splits into
  the ledger's terms.
- :mod:`~torch_momentum.balance.symmetry`: every symmetry of a model's loss
  (:func:`find_symmetries`), verified numerically, with its per-unit charges.
- :mod:`~torch_momentum.balance.ledger`: :class:`BalanceLedger`, the exact accounting of every
  step, for layer pairs, hidden units and every symmetry's charge.
- :mod:`~torch_momentum.balance.groups`: the default groups of a real network's parameters and
  readable names for them.
"""

from torch_momentum.balance._parts import SymmetryPart
from torch_momentum.balance.layers import (
    ROOT_LAYER_NAME,
    adjacent_pairs,
    check_layers_spec,
    discover_layers,
)
from torch_momentum.balance.ledger import BalanceLedger
from torch_momentum.balance.norms import (
    balance_metrics,
    layer_grad_sq_norms,
    layer_sq_norms,
    layer_sq_norms_host,
    layer_sq_norms_many,
)
from torch_momentum.balance.rules import LEDGER_TERMS
from torch_momentum.balance.symmetry import Symmetry, SymmetryList, find_symmetries
from torch_momentum.balance.units import UnitLayer, pair_units, unit_balance, unit_symmetry

__all__ = [
    "LEDGER_TERMS",
    "ROOT_LAYER_NAME",
    "BalanceLedger",
    "Symmetry",
    "SymmetryList",
    "SymmetryPart",
    "UnitLayer",
    "adjacent_pairs",
    "balance_metrics",
    "check_layers_spec",
    "discover_layers",
    "find_symmetries",
    "layer_grad_sq_norms",
    "layer_sq_norms",
    "layer_sq_norms_host",
    "layer_sq_norms_many",
    "pair_units",
    "unit_balance",
    "unit_symmetry",
]
