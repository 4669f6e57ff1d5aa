"""``torch_momentum.functional.lookahead_shift``: ``p <- p + alpha * v`` on every path."""

from __future__ import annotations

import pytest
import torch

from torch_momentum.functional import lookahead_shift, momentum_sgd

# alpha = 0.25 is a power of two: alpha * v is exact in float64, so every path rounds once
# (the final addition) and the results are bit-identical to p + alpha * v.
ALPHAS = {
    "float": lambda: 0.25,
    "host-tensor": lambda: torch.tensor(0.25, dtype=torch.float64),
    "tracked-tensor": lambda: torch.tensor(0.25, dtype=torch.float64, requires_grad=True),
}


def _tensors() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    params = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    return params, [torch.randn_like(p) for p in params]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
def test_lookahead_shift_adds_alpha_times_velocity(foreach, alpha):
    params, velocities = _tensors()
    expected = [p + 0.25 * v for p, v in zip(params, velocities, strict=True)]
    with torch.no_grad():
        lookahead_shift(params, velocities, ALPHAS[alpha](), foreach=foreach)
    assert all(torch.equal(p, e) for p, e in zip(params, expected, strict=True))


@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
def test_lookahead_shift_takes_sparse_velocities_even_with_foreach(alpha):
    params, velocities = _tensors()
    velocities[0] = velocities[0].to_sparse()
    expected = [p + 0.25 * v.to_dense() for p, v in zip(params, velocities, strict=True)]
    with torch.no_grad():
        lookahead_shift(params, velocities, ALPHAS[alpha](), foreach=True)
    assert all(torch.equal(p, e) for p, e in zip(params, expected, strict=True))


def test_lookahead_shift_by_zero_leaves_the_parameters():
    params, velocities = _tensors()
    before = [p.clone() for p in params]
    lookahead_shift(params, velocities, 0.0)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])
def test_momentum_sgd_refuses_sparse_gradients_with_weight_decay_before_any_change(fused):
    """The same check and words as the optimisers' step (without the param group)."""
    params = [torch.ones(3, 2), torch.ones(4)]
    grads = [torch.ones(3, 2).to_sparse(), torch.ones(4)]
    velocities = [torch.zeros_like(g) for g in grads]
    with pytest.raises(RuntimeError, match=r"^weight_decay=0.01 is not supported with sparse"):
        momentum_sgd(
            params, grads, velocities, lr=0.1, momentum=0.9, weight_decay=0.01, maximize=False,
            nesterov=False, fused=fused,
        )  # fmt: skip
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)
    assert all(v._nnz() == 0 if v.is_sparse else v.count_nonzero() == 0 for v in velocities)
