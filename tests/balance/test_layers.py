"""Which parameters form a layer: ``discover_layers`` (default layers, named modules, parameter
dicts, overlaps) in plain torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_momentum.balance import discover_layers

pytestmark = pytest.mark.usefixtures("one_thread")


class _Owner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))  # owned by the root module
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(2, 1)
        self.head.bias.requires_grad_(False)


def test_discover_default_layers_in_registration_order() -> None:
    found = discover_layers(_Owner())
    assert list(found) == ["root", "body.0", "body.2", "head"]  # frozen module: not a layer
    assert [n for n, _ in found["body.0"]] == ["body.0.weight", "body.0.bias"]
    assert [n for n, _ in found["head"]] == ["head.weight"]  # frozen bias left out
    assert [n for n, _ in found["root"]] == ["scale"]


def test_discover_named_modules_keeps_order_and_recurses() -> None:
    model = _Owner()
    found = discover_layers(model, ["head", "frozen", "body"])
    assert list(found) == ["head", "frozen", "body"]  # the given order defines adjacency
    # a named module contributes all of its parameters, recursively, frozen ones included
    assert [n for n, _ in found["body"]] == ["body.0.weight", "body.0.bias", "body.2.weight"]
    assert [n for n, _ in found["frozen"]] == ["frozen.weight", "frozen.bias"]
    assert found["head"][1][1] is model.head.bias
    with pytest.raises(ValueError, match=r"'nope'.*body\.0"):
        discover_layers(model, ["head", "nope"])
    with pytest.raises(ValueError, match="twice"):
        discover_layers(model, ["head", "head"])
    with pytest.raises(ValueError, match="no parameters"):
        discover_layers(model, ["head", "body.1"])
    with pytest.raises(TypeError, match="layers"):
        discover_layers(model, "head")


def test_discover_parameter_dict() -> None:
    model = _Owner()
    found = discover_layers(model, {"in": ["body.0.weight", "body.0.bias"], "out": ["head.weight"]})
    assert list(found) == ["in", "out"]
    assert found["in"][1][1] is model.body[0].bias
    with pytest.raises(ValueError, match=r"'body\.9\.weight'"):
        discover_layers(model, {"in": ["body.9.weight"], "out": ["head.weight"]})
    with pytest.raises(ValueError, match="empty"):
        discover_layers(model, {"in": [], "out": ["head.weight"]})
    with pytest.raises(TypeError, match="list of parameter names"):
        discover_layers(model, {"in": "body.0.weight", "out": ["head.weight"]})


def test_overlapping_layers_are_an_error() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"overlap.*'0\.0\.weight'.*'0'.*'0\.0'"):
        discover_layers(net, ["0", "0.0"])
    with pytest.raises(ValueError, match=r"overlap.*'1\.weight'"):
        discover_layers(net, {"a": ["1.weight"], "b": ["1.weight", "0.0.weight"]})
