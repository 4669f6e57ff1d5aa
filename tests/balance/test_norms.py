"""Squared norms of many layers in one pass (``layer_sq_norms*``) and ``balance_metrics``, in plain
torch (no Trainer involved)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.helpers.cuda import no_host_sync, requires_cuda
from torch_momentum.balance import (
    adjacent_pairs,
    balance_metrics,
    layer_grad_sq_norms,
    layer_sq_norms,
    layer_sq_norms_host,
    layer_sq_norms_many,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _naive(layers: list[list[torch.Tensor | None]]) -> list[float]:
    """Reference: sum of |x|^2 in float64, one tensor at a time."""
    return [
        sum(
            float(t.detach().to(torch.complex128).abs().square().sum())
            for t in layer
            if t is not None
        )
        for layer in layers
    ]


def test_layer_sq_norms_match_naive_mixed_dtypes() -> None:
    g = torch.Generator().manual_seed(0)
    layers: list[list[torch.Tensor | None]] = [
        [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g)],
        [torch.randn(4, 4, generator=g).to(torch.bfloat16), None],
        [torch.randn(2, 3, generator=g, dtype=torch.complex64)],
        [],  # an empty layer has norm 0
        [torch.zeros(0, 3)],
    ]
    got = layer_sq_norms(layers)
    assert got.dtype == torch.float64 and got.shape == (5,)
    # float32/bf16/complex64 tensors accumulate in float32 (relative error ~1e-7 over a few
    # dozen entries); the float64-only layer is exact to a few ulps. rtol 1e-6 covers both.
    torch.testing.assert_close(
        got, torch.tensor(_naive(layers), dtype=torch.float64), rtol=1e-6, atol=0
    )
    f64 = [[layers[0][0]]]
    # float64 in float64: the sum of 15 squares differs from the reference by a few ulps
    torch.testing.assert_close(
        layer_sq_norms(f64), torch.tensor(_naive(f64), dtype=torch.float64), rtol=1e-14, atol=0
    )


def test_layer_sq_norms_many_is_one_pass_per_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both groups' float32 tensors take one multi-tensor norm call, with the naive values.

    This test pins which kernel runs; it spies on a private torch API (``torch._foreach_norm``).
    """
    calls: list[int] = []
    real = torch._foreach_norm

    def spy(tensors, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", spy)
    params = [[torch.randn(3, 3), torch.randn(3)], [torch.randn(2, 3)]]
    grads = [[torch.randn(3, 3), None], [torch.randn(2, 3)]]
    sq, gsq = layer_sq_norms_many([params, grads])
    assert calls == [5]  # the 5 float32 tensors of both groups in one multi-tensor call
    # float32 accumulation, rtol as above
    torch.testing.assert_close(
        sq, torch.tensor(_naive(params), dtype=torch.float64), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        gsq, torch.tensor(_naive(grads), dtype=torch.float64), rtol=1e-6, atol=0
    )


def test_host_path_matches_device_path() -> None:
    g = torch.Generator().manual_seed(1)
    params = [[torch.randn(7, 5, generator=g, dtype=torch.float64)], [torch.randn(4, generator=g)]]
    grads = [[None], [torch.randn(4, generator=g).to(torch.bfloat16)]]
    host = layer_sq_norms_host([params, grads])
    device = [t.tolist() for t in layer_sq_norms_many([params, grads])]
    # the same norms, squared on the host instead of the device: identical float64 arithmetic
    assert host == device
    assert host[1][0] == 0.0


def test_layer_grad_sq_norms_missing_grad_counts_zero() -> None:
    a = nn.Parameter(torch.randn(4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(2, dtype=torch.float64))
    (a.sum() * 2).backward()  # b gets no gradient
    got = layer_grad_sq_norms([[a], [b], [a, b]])
    # exact: the gradient is 2 in 4 entries; its norm sqrt(16) = 4 and 4^2 = 16 involve no rounding
    assert got.tolist() == [16.0, 0.0, 16.0]


def test_balance_metrics_keys_and_values() -> None:
    names = ["a", "b", "c"]
    sq = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    sq0 = torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
    gsq = torch.tensor([9.0, 16.0, 0.0], dtype=torch.float64)
    m = balance_metrics(sq, sq0, gsq, names)
    expected = {
        "balance/sq_norm/a": 4.0,
        "balance/sq_norm/b": 2.0,
        "balance/sq_norm/c": 1.0,
        "balance/sq_norm_change/a": 1.0,
        "balance/sq_norm_change/b": 0.0,
        "balance/sq_norm_change/c": 0.5,
        "balance/sq_norm_diff/a-b": 2.0,
        "balance/sq_norm_diff/b-c": 1.0,
        "balance/sq_norm_ratio/a-b": 2.0,
        "balance/sq_norm_ratio/b-c": 2.0,
        # diff(0) = (1, 1.5), diff(t) = (2, 1): max(|1|, |-0.5|)
        "balance/drift": 1.0,
        "grad_norm/a": 3.0,
        "grad_norm/b": 4.0,
        "grad_norm/c": 0.0,
        "grad_norm/total": 5.0,
    }
    assert m == expected  # small binary-exact numbers: exact equality is the right check
    assert all(type(v) is float for v in m.values())
    assert set(balance_metrics(sq, sq0, None, names)) == {
        k for k in expected if k.startswith("balance/")
    }
    assert adjacent_pairs(names) == [("a", "b"), ("b", "c")]


def test_balance_metrics_zero_norm_ratio_and_tensor_inputs() -> None:
    m = balance_metrics([1.0, 0.0, 0.0], [1.0, 1.0, 1.0], None, ["a", "b", "c"])
    assert m["balance/sq_norm_ratio/a-b"] == math.inf
    assert math.isnan(m["balance/sq_norm_ratio/b-c"])
    as_tensors = balance_metrics(
        torch.tensor([1.0, 0.0, 0.0]), torch.ones(3, dtype=torch.float64), None, ["a", "b", "c"]
    )
    assert as_tensors.keys() == m.keys()
    assert as_tensors["balance/drift"] == m["balance/drift"] == 1.0


def test_balance_metrics_needs_two_layers() -> None:
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="no adjacent pairs"):
        balance_metrics(one, one, one, ["only"])
    with pytest.raises(ValueError, match="names"):
        balance_metrics(torch.ones(3), torch.ones(3), None, ["a", "b"])


@requires_cuda
def test_norm_arithmetic_has_no_host_sync() -> None:
    """``layer_sq_norms`` of CUDA tensors does not synchronise with the host (the monitor calls
    it during training)."""
    layers = [[torch.randn(100, 100, device="cuda")], [torch.randn(10, 100, device="cuda")]]
    with no_host_sync():
        out = layer_sq_norms(layers)
    expected = [sum(t.double().pow(2).sum().item() for t in layer) for layer in layers]
    torch.testing.assert_close(
        out.cpu(), torch.tensor(expected, dtype=out.dtype), rtol=1e-6, atol=0
    )


def test_discrete_identity_plain_torch_loop() -> None:
    """One GD step changes ||W_h||^2 - ||W_{h+1}||^2 by lr^2 (||g_h||^2 - ||g_{h+1}||^2)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 8, bias=False),
        nn.ReLU(),
        nn.Linear(8, 5, bias=False),
        nn.ReLU(),
        nn.Linear(5, 2, bias=False),
    ).double()
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    layers = [[m.weight] for m in net[::2]]
    lr = 0.1
    for _ in range(3):
        net.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        sq, gsq = layer_sq_norms(layers), layer_grad_sq_norms(layers)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(p.grad, alpha=-lr)
        new = layer_sq_norms(layers)
        change = (new[:-1] - new[1:]) - (sq[:-1] - sq[1:])
        predicted = lr**2 * (gsq[:-1] - gsq[1:])
        # float64: each squared norm carries a relative rounding error of a few 1e-16, so the
        # difference is exact to ~1e-15 * ||W||^2; the predicted change is ~1e-4, and omitting the
        # cross terms or the lr^2 would be off by orders of magnitude more than 1e-12.
        torch.testing.assert_close(change, predicted, rtol=0, atol=1e-12 * float(sq.max()))
        assert predicted.abs().min() > 1e-8  # the test is not vacuous
