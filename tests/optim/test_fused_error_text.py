"""``fused=True`` with parameters the fused kernel cannot take: the error starts with the
built-in's exact message (code written against ``torch.optim.SGD(fused=True)`` matches on its
words), followed by ours."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_momentum import NesterovSGD, PolyakSGD

CLASSES = [PolyakSGD, NesterovSGD]
BUILTIN_WORDS = (
    "`fused=True` requires all the params to be floating point Tensors of supported devices"
)


def _builtin_message(params: list[torch.Tensor]) -> str:
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    return str(err.value)


def _params(kind: str) -> list[torch.Tensor]:
    if kind == "meta":
        with torch.device("meta"):
            params = list(nn.Linear(4, 3).parameters())
    else:
        params = [torch.zeros(3, dtype=torch.int64)]
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind", ["meta", "int64"])
def test_fused_error_starts_with_the_builtins_message(cls, kind):
    builtin = _builtin_message(_params(kind))
    assert builtin.startswith(BUILTIN_WORDS)  # the words themselves, as torch 2.13 writes them
    params = _params(kind)
    opt = cls(params, lr=0.1, momentum=0.9, fused=True)  # checked at step(), as the built-in
    with pytest.raises(RuntimeError) as err:
        opt.step()
    ours = str(err.value)
    assert ours.startswith(builtin)  # the built-in's full message, then our detail
    assert f"{cls.__name__}: param group 0, parameter 0 is a " in ours[len(builtin) :]
    assert len(opt.state) == 0
