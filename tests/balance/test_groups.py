"""Readable names of a model's groups and symmetries: one source, one zero padding."""

from __future__ import annotations

import torch
from torch import nn

from torch_momentum import PolyakSGD
from torch_momentum.balance import find_symmetries
from torch_momentum.balance.groups import clean_names, weight_groups
from torch_momentum.balance.watch import NetworkWatch


def _deep() -> nn.Sequential:
    """Linear layers at the indices 0, 2, ..., 10: group names need two digits."""
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(5):
        mods += [nn.Linear(4, 4), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(4, 3))


def test_groups_and_symmetries_pad_alike() -> None:
    """The groups' labels ("00", ..., "10") and the symmetries' ("00/02", ..., "08/10",
    "10 (columns + bias)") take the model's index width, in the summary's keys and in the
    watch's ledger keys (was: "0/2" beside "00", the summary padding only "."-separated
    components)."""
    net = _deep()
    batch = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    symmetries = find_symmetries(net, loss, [batch])
    assert [s.name for s in symmetries][:2] == ["0/2", "2/4"]
    assert list(weight_groups(net))[:2] == ["00", "02"]
    opt = PolyakSGD(net.parameters(), lr=0.1)
    watch = NetworkWatch(net, [opt], symmetries, per_layer=True, ledger=True)
    expected = ["00/02", "02/04", "04/06", "06/08", "08/10", "10 (columns + bias)"]
    assert watch.summary.labels == expected
    watch.start()
    opt.zero_grad()
    loss(net, batch).backward()
    opt.step()
    metrics = watch.metrics()
    assert list(watch.last_ledger) == expected
    assert {f"charge/{label}" for label in expected} <= set(metrics)
    watch.close()


def test_clean_names_pads_indices_only() -> None:
    """Digits inside a word or after "(" are not indices; the module widens the padding."""
    names = ["layer1.2.conv1 (per channel)", "stream into head (12 layers)", "3/4"]
    assert list(clean_names(names).values()) == names
    wide = nn.Sequential(*[nn.Identity() for _ in range(10)], nn.Linear(1, 1))
    assert list(clean_names(names, module=wide).values()) == [
        "layer1.02.conv1 (per channel)",
        "stream into head (12 layers)",
        "03/04",
    ]


class _Wrapper(nn.Module):
    """What a LightningModule is to its network: one child holding every parameter (and a
    child without parameters, e.g. a loss)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.loss = nn.CrossEntropyLoss()


def test_the_name_of_a_wrapped_network_is_stripped() -> None:
    """``net.`` of a module that only wraps ``self.net`` goes, as ``model.`` always did (the
    monitor's keys read ``net.3`` on a LightningModule holding ``self.net`` before); a module
    with two parameter holders, or a container, keeps its names."""
    wrapped = _Wrapper(_deep())
    assert list(weight_groups(wrapped))[:2] == ["00", "02"]
    twice = _Wrapper(_Wrapper(_deep()))
    named = clean_names(["net.net.4.weight", "net.net 0/2"], module=twice)
    assert list(named.values()) == ["04.weight", "00/02"]
    both = nn.Module()
    both.a, both.b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert list(clean_names(["a.weight", "b"], module=both).values()) == ["a.weight", "b"]
    container = nn.Sequential(nn.Linear(2, 2))
    assert list(weight_groups(container)) == ["0", "other"]  # the bias is in "other"


def test_a_compiled_submodule_leaves_no_orig_mod_in_labels() -> None:
    """``torch.compile`` of a submodule names its parameters ``3._orig_mod.weight``: the labels
    drop ``._orig_mod`` wherever it stands (before, only a leading ``_orig_mod.`` went)."""
    names = ["3._orig_mod.weight", "1/3._orig_mod", "3._orig_mod (per channel)", "a._orig_modx"]
    assert list(clean_names(names).values()) == [
        "3.weight",
        "1/3",
        "3 (per channel)",
        "a._orig_modx",
    ]
