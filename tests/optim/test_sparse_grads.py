"""Sparse gradients (``nn.Embedding(sparse=True)``), supported as ``torch.optim.SGD`` supports
them: the same parameters and buffers bit for bit on every path, the same refusal of weight
decay (ours before anything changes), and the NesterovSGD mode switch and state-dict migration
with a sparse velocity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_momentum import NesterovSGD, PolyakSGD, to_sgd_state_dict

CLASSES = [PolyakSGD, NesterovSGD]
PATHS = {
    "default": {},
    "forloop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


class Model(nn.Module):
    """A sparse embedding (rows looked up twice in a batch: uncoalesced gradients) and a dense
    linear read-out, so that every step mixes sparse and dense gradients in one param group."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(40, 5, sparse=True)
        self.out = nn.Linear(5, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(self.emb(idx))).pow(2).mean()


def builtin(cls: type, params, **kw) -> torch.optim.SGD:
    nesterov = cls is NesterovSGD and kw.get("momentum", 0) != 0
    return torch.optim.SGD(params, nesterov=nesterov, **kw)


def train(model: Model, opt: torch.optim.Optimizer, steps: int = 6) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 40, (4, 6), generator=gen)  # duplicates within the batch
        opt.zero_grad()
        model(idx).backward()
        opt.step()


def velocity_and_buffer(ours, theirs, p) -> tuple[torch.Tensor, torch.Tensor]:
    return ours.state[p]["velocity"], theirs.state[p]["momentum_buffer"]


def assert_same_sparse_negated(v: torch.Tensor, buf: torch.Tensor) -> None:
    """velocity == -momentum_buffer entry for entry (same indices in the same order)."""
    assert v.layout == buf.layout
    if v.is_sparse:
        assert torch.equal(v._indices(), buf._indices())
        assert torch.equal(v._values(), -buf._values())
    else:
        assert torch.equal(v, -buf)


# Our path -> the built-in path it must equal bit for bit. The built-in's fused kernel refuses
# sparse gradients ("`_fused_sgd` does not support sparse gradients"); ours sends the sparse
# tensors to the reference path, so with the embedding alone fused=True equals the for-loop.
BUILTIN_PATH = {
    "default": {},
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"foreach": False},
}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "kw",
    [
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.0},
        {"lr": 0.1, "momentum": 0.5, "maximize": True},
        {"lr": torch.tensor(0.1), "momentum": 0.9},
    ],
    ids=["momentum", "no-momentum", "maximize", "tensor-lr"],
)
def test_sparse_gradients_match_builtin_bit_for_bit(cls, path, kw):
    ours_model, ref_model = Model(), Model()
    if path == "fused":  # the dense read-out would take the fused kernel, which rounds otherwise
        for m in (ours_model, ref_model):
            m.out.requires_grad_(False)
    ours = cls([p for p in ours_model.parameters() if p.requires_grad], **kw, **PATHS[path])
    ref = builtin(
        cls, [p for p in ref_model.parameters() if p.requires_grad], **kw, **BUILTIN_PATH[path]
    )
    train(ours_model, ours)
    train(ref_model, ref)
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
        if kw["momentum"] != 0 and p.requires_grad:
            assert_same_sparse_negated(ours.state[p]["velocity"], ref.state[q]["momentum_buffer"])
    velocity = ours.state[ours_model.emb.weight].get("velocity")
    assert (velocity is not None and velocity.is_sparse) == (kw["momentum"] != 0)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_gradients_with_weight_decay_are_refused_before_any_change(cls, momentum):
    """The built-in fails inside its step ('add(sparse, dense) is not supported', after updating
    the parameters before the embedding); ours says why before anything moves."""
    model = Model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = cls(
        [{"params": model.out.parameters()}, {"params": model.emb.parameters()}],
        lr=0.1,
        momentum=momentum,
        weight_decay=0.01,
    )
    model(torch.tensor([[1, 2, 1]])).backward()
    with pytest.raises(RuntimeError, match=r"param group 1: weight_decay=0.01 is not supported"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert len(opt.state) == 0
    ref = builtin(cls, Model().parameters(), lr=0.1, momentum=momentum, weight_decay=0.01)
    for p in ref.param_groups[0]["params"]:
        p.grad = model.emb.weight.grad if p.shape == model.emb.weight.shape else torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="add\\(sparse, dense\\) is not supported"):
        ref.step()


def test_nesterov_mode_switch_and_iterate_with_a_sparse_velocity():
    model = Model()
    opt = NesterovSGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, steps=3)
    w = model.emb.weight
    v = opt.state[w]["velocity"]
    assert v.is_sparse
    x = opt.iterate(w)
    assert torch.equal(x, w.detach().add(v, alpha=-opt.lookahead_coefficient(0)))
    y = w.detach().clone()
    opt.eval()
    assert torch.equal(w.detach(), x)  # eval() rounds like iterate()
    assert torch.equal(opt.iterate(w), x) and opt.lookahead_coefficient(0) == 0.0
    opt.train()
    # back at the look-ahead: x + c v, within one rounding of y per element (float32: 2**-24
    # relative, ~1e-7 of |y| <= a few units; a wrong sign or a missing row would be O(0.1))
    torch.testing.assert_close(w.detach(), y, rtol=0, atol=1e-6)
    train(model, opt, steps=2)  # and it keeps training from there


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_sparse_velocity_migrates_both_ways_bit_for_bit(cls):
    """to_sgd_state_dict / load_state_dict with a sparse velocity: the built-in continues from
    ours, and ours from the built-in, exactly as an uninterrupted run."""
    kw = {"lr": 0.1, "momentum": 0.9}
    straight_model = Model()
    straight = builtin(cls, straight_model.parameters(), **kw)
    train(straight_model, straight, steps=6)

    a = Model()
    ours = cls(a.parameters(), **kw)
    train(a, ours, steps=3)
    theirs = builtin(cls, a.parameters(), **kw)
    theirs.load_state_dict(to_sgd_state_dict(ours))
    again = cls(a.parameters(), **kw)
    again.load_state_dict(theirs.state_dict())
    gen_state = torch.Generator().manual_seed(0)
    for _ in range(3):  # skip the first three batches of train()'s stream
        torch.randint(0, 40, (4, 6), generator=gen_state)
    for _ in range(3):
        idx = torch.randint(0, 40, (4, 6), generator=gen_state)
        again.zero_grad()
        a(idx).backward()
        again.step()
    for p, q in zip(a.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert_same_sparse_negated(again.state[p]["velocity"], straight.state[q]["momentum_buffer"])
