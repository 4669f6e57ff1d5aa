"""stationarity_profile's progress callback (bar, budget, stop request) and the choice between
torch.func.vmap and a loop of torch.autograd.grad calls."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from torch_momentum import _sampling, stationarity_profile


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    data = torch.randn(40, 5, generator=gen(4), dtype=torch.float64)
    target = torch.randn(40, 1, generator=gen(5), dtype=torch.float64)

    def f(p):
        return (functional_call(net, p, (data,)) - target).abs().mean()

    return f, {n: p.detach() for n, p in net.named_parameters()}


def test_progress_sees_every_block():
    f, x = _mlp_problem()
    calls = []
    stationarity_profile(
        f, x, [1e-2, 1e-1], num_samples=12, chunk_size=4, generator=gen(),
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert calls == [(0, 24), (4, 24), (8, 24), (12, 24), (16, 24), (20, 24), (24, 24)]


@pytest.mark.parametrize("memory", ["device", "host", "recompute"])
def test_a_stop_request_keeps_a_valid_weaker_certificate(memory):
    """Stopped after 8 of 12 samples in the first radius: every radius uses those 8 points.
    The hull of a subset of the points is inside the hull of all of them, so its min-norm is
    at least the full one's: the truncated certificate is valid and weaker."""
    f, x = _mlp_problem()
    radii = [1e-2, 1e-1]
    full = stationarity_profile(
        f, x, radii, num_samples=12, chunk_size=4, generator=gen(), memory=memory
    )
    calls = []

    def stop_at_8(done, total):
        calls.append((done, total))
        return done >= 8

    cut = stationarity_profile(
        f, x, radii, num_samples=12, chunk_size=4, generator=gen(), memory=memory,
        progress=stop_at_8,
    )  # fmt: skip
    assert cut.num_samples == 8 and full.num_samples == 12
    assert calls == [(0, 24), (4, 24), (8, 24), (12, 16), (16, 16)]
    assert cut.grad_norm == full.grad_norm
    for c, a in zip(cut.eps_hat, full.eps_hat, strict=True):
        # float64 Wolfe optimality is exact to 1e-12 of max|s|^2: a margin of 1e-10 relative
        assert c >= a * (1 - 1e-10)
    assert all(n <= 8 for n in cut.active)


def test_an_exception_in_progress_propagates_and_leaves_x_alone():
    f, x = _mlp_problem()
    before = {n: t.clone() for n, t in x.items()}

    def boom(done, total):
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stationarity_profile(f, x, [0.1], num_samples=8, chunk_size=4, progress=boom)
    assert all(torch.equal(x[n], before[n]) for n in x)
    with pytest.raises(TypeError, match="progress must be callable"):
        stationarity_profile(f, x, [0.1], progress=3)  # type: ignore[arg-type]


class _LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int = 20, hidden: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        return self.out(self.lstm(self.emb(tokens))[0])


def test_lstm_uses_the_loop_with_one_warning():
    """torch.func.vmap has no batching rule for the LSTM kernel (torch warns of a performance
    drop and runs it one sample at a time): the loop is chosen, one warning of ours says why,
    torch's warning does not reach the user, and the profile equals the loop's."""
    torch.manual_seed(0)
    model = _LSTMLanguageModel()  # float32: the oneDNN LSTM kernel (float64 decomposes: vmaps)
    tokens = torch.randint(0, 20, (6, 9), generator=gen(1))

    def f(p):
        logits = functional_call(model, p, (tokens[:, :-1],))
        return nn.functional.cross_entropy(logits.reshape(-1, 20), tokens[:, 1:].reshape(-1))

    x = {n: p.detach() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = stationarity_profile(f, x, [1e-2, 1e-1], num_samples=8, generator=gen())
    ours = [w for w in caught if "stationarity_profile:" in str(w.message)]
    assert len(ours) == 1 and "no batching rule" in str(ours[0].message)
    assert not [w for w in caught if "There is a performance drop" in str(w.message)]
    assert not auto.vectorized
    loop = stationarity_profile(f, x, [1e-2, 1e-1], num_samples=8, generator=gen(), vectorize=False)
    # the first block's gradients come from vmap, the rest from the loop: the same gradients
    # up to float32 rounding (1e-7 relative per entry); 1e-4 bounds that, a wrong gradient
    # (another point or sample) changes eps_hat by O(1)
    assert auto.eps_hat == pytest.approx(loop.eps_hat, rel=1e-4)


@pytest.mark.parametrize(
    ("times", "vectorized"),
    [
        # (first block vectorised, loop on 4 points, 4 points vectorised) in seconds
        ((1.0, 0.01, 0.002), True),  # vmap's start-up cost, then vmap faster: keep vmap
        ((1.0, 0.01, 0.1), False),  # the loop is faster both ways: switch
        ((0.3, 0.1, 1.0), True),  # whole block: the loop is not 1.5x faster, keep vmap
        ((0.04, 0.001, 1.0), True),  # under 50 ms: not worth timing the loop, keep vmap
    ],
)
def test_the_timing_rule(monkeypatch, times, vectorized):
    """The rule itself, with the clock replaced: the loop replaces vmap only when the first
    block took 50 ms or more and the loop is 1.5x faster both on the whole first block
    (estimated from 4 points) and on 4 points again.

    This test pins which evaluation runs (``res.vectorized``); it replaces the private clock
    ``torch_momentum._sampling._timed`` (a renamed clock fails here, never silently)."""
    first, loop4, vmap4 = times
    clock = iter([first, loop4, vmap4, vmap4, loop4])

    def fake_timed(fn):
        return fn(), next(clock)

    monkeypatch.setattr(_sampling, "_timed", fake_timed)
    f, x = _mlp_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = stationarity_profile(f, x, [0.1], num_samples=16, chunk_size=16, generator=gen())
    assert res.vectorized is vectorized
    ours = [str(w.message) for w in caught if "the loop is faster" in str(w.message)]
    assert len(ours) == (0 if vectorized else 1)
