"""Which module consumes which module's output: one forward pass with hooks, and its autograd graph.

Private helper of :mod:`torch_momentum.balance.symmetry`. :class:`CallRecorder` records every
leaf module call with its input and output tensors; :class:`DataFlow` then links each module
input to the module that produced it:

* by tensor identity, looking through modules that commute with a positive per-channel scale
  (ReLU, LeakyReLU, PReLU, Identity, Dropout, pooling, Flatten, whose ``block`` is the number of
  positions a Flatten puts after each channel);
* where identity fails (functional code in between), by walking the autograd graph back through
  shape and elementwise-homogeneous operations (slice, view, transpose, ReLU, dropout...), means,
  sums, pooling and padding over positions, with the block left to infer (``0``).

It also finds the *writers* of a residual stream: the module outputs summed (through additions
and shape operations only) into the input of a LayerNorm/RMSNorm that no single module produced.
Links are only hints: every candidate built from them is verified numerically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

PASS_THROUGH = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
)
# Autograd nodes that move or select entries, or act on them one by one and commute with a
# positive scale: a producer's units reach a consumer through them (up to a layout change).
_SHAPE_OPS = frozenset(
    {
        "AliasBackward0",
        "SliceBackward0",
        "SelectBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "CloneBackward0",
        "ExpandBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ToCopyBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
        "NativeDropoutBackward0",
        "ReluBackward0",
        "LeakyReluBackward0",
        # reductions over positions and padding: a channel stays a channel, scaled alike
        "MeanBackward0",
        "MeanBackward1",
        "SumBackward0",
        "SumBackward1",
        "ConstantPadNdBackward0",
        "ReflectionPad1DBackward0",
        "ReflectionPad2DBackward0",
        "ReflectionPad3DBackward0",
        "ReplicationPad1DBackward0",
        "ReplicationPad2DBackward0",
        "ReplicationPad3DBackward0",
        "AvgPool1DBackward0",
        "AvgPool2DBackward0",
        "AvgPool3DBackward0",
        "AdaptiveAvgPool2DBackward0",
        "AdaptiveAvgPool3DBackward0",
        "MaxPool2DWithIndicesBackward0",
        "MaxPool3DWithIndicesBackward0",
    }
)
_SUMS = frozenset({"AddBackward0", "SubBackward0"})
_WALK_LIMIT = 10_000


@dataclass
class Call:
    """One call of a recorded module: its name, the module and its input and output tensors."""

    name: str
    module: nn.Module
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


def _tensors(obj: Any, depth: int = 3) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth - 1)


class CallRecorder:
    """Context manager: forward hooks on every leaf module (and every MultiheadAttention).

    The hooks only append to :attr:`calls` (the tensors are kept alive, so that their identity
    tells which module consumed which module's output); they are removed on exit.

    Example:
        >>> import torch
        >>> from torch_momentum.balance._symmetry_trace import CallRecorder
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> with CallRecorder(model) as rec:
        ...     _ = model(torch.randn(2, 3))
        >>> [c.name for c in rec.calls]
        ['0', '1']
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[Call] = []
        self._handles: list[Any] = []

    def __enter__(self) -> CallRecorder:
        for name, module in self.model.named_modules():
            if _recorded(name, module):
                self._handles.append(
                    module.register_forward_hook(self._hook(name), with_kwargs=True)
                )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            inputs = (*_tensors(args), *_tensors(kwargs))
            self.calls.append(Call(name, module, inputs, tuple(_tensors(output))))

        return hook


def _recorded(name: str, module: nn.Module) -> bool:
    """Leaf modules and MultiheadAttention are recorded; a module whose only child holds its
    parametrizations (``torch.nn.utils.parametrize``: weight norm, spectral norm...) counts as
    a leaf, and the parametrizations themselves are not recorded."""
    if "parametrizations" in name.split("."):
        return False
    children = [n for n, _ in module.named_children() if n != "parametrizations"]
    return not children or isinstance(module, nn.MultiheadAttention)


def _flatten_block(module: nn.Flatten, shape: torch.Size) -> int | None:
    """Entries per channel after ``module`` flattens a ``(N, C, ...)`` input, or None."""
    ndim = len(shape)
    if ndim < 2:
        return None
    start, end = module.start_dim % ndim, module.end_dim % ndim
    if start != 1 or end != ndim - 1:
        return None
    return math.prod(shape[2:])


def _passes_through(call: Call) -> bool:
    """Modules looked through: :data:`PASS_THROUGH`, and any other parameter-free elementwise
    module (GELU, SiLU, Tanh...) except norms, so that the candidates across it are proposed
    and the verification shows that it breaks them."""
    module = call.module
    if isinstance(module, PASS_THROUGH):
        return True
    return (
        next(module.parameters(), None) is None
        and not any(hasattr(module, attr) for attr in ("eps", "variance_epsilon"))
        and len(call.inputs) == 1
        and len(call.outputs) == 1
        and call.inputs[0].shape == call.outputs[0].shape
    )


class DataFlow:
    """Links ``(producer, consumer, block)`` between recorded module calls, and stream writers.

    ``block``: consumer input units per producer unit; ``0`` where the link was found through
    the autograd graph (the layout may have changed: the caller infers it from the sizes).

    Example:
        >>> import torch
        >>> from torch_momentum.balance._symmetry_trace import CallRecorder, DataFlow
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...     torch.nn.Linear(8, 3))
        >>> with CallRecorder(model) as rec:
        ...     _ = model(torch.randn(5, 1, 4, 4))
        >>> DataFlow(rec.calls).links
        [('0', '3', 4)]
    """

    def __init__(self, calls: list[Call]) -> None:
        self.calls = calls
        self.links: list[tuple[str, str, int]] = []
        self._source: dict[int, tuple[str, int]] = {}
        self._owners: dict[Any, tuple[str, int]] = {}
        for call in calls:
            self._add(call)

    def _remember(self, tensor: Tensor, hit: tuple[str, int]) -> None:
        self._source[id(tensor)] = hit
        if tensor.grad_fn is not None:
            self._owners.setdefault(tensor.grad_fn, hit)

    def _lookup(self, tensor: Tensor) -> tuple[str, int] | None:
        hit = self._source.get(id(tensor))
        node = tensor.grad_fn
        for _ in range(32):  # through functional shape operations
            if hit is not None or node is None:
                break
            if node in self._owners:
                return (self._owners[node][0], 0)
            if node.name() not in _SHAPE_OPS or not node.next_functions:
                return None
            node = node.next_functions[0][0]
        return hit

    def _add(self, call: Call) -> None:
        if _passes_through(call):
            hit = self._lookup(call.inputs[0]) if len(call.inputs) == 1 else None
            if hit is not None and isinstance(call.module, nn.Flatten):
                inner = _flatten_block(call.module, call.inputs[0].shape)
                hit = None if inner is None or hit[1] == 0 else (hit[0], hit[1] * inner)
            for out in call.outputs if hit is not None else ():
                self._remember(out, hit)  # type: ignore[arg-type]
            return
        for tensor in call.inputs:
            hit = self._lookup(tensor)
            link = None if hit is None else (hit[0], call.name, hit[1])
            if link is not None and link[0] != call.name and link not in self.links:
                self.links.append(link)
        for out in call.outputs:
            self._remember(out, (call.name, 1))

    def produced_directly(self, tensor: Tensor) -> bool:
        """Whether a recorded module (through pass-through modules) output ``tensor`` itself."""
        return id(tensor) in self._source

    def writers(self, tensor: Tensor) -> list[str] | None:
        """The modules whose outputs are summed into ``tensor``, or None if anything else is.

        Walks the autograd graph back from ``tensor`` through additions, subtractions, products
        with a constant and shape operations; every path must end at a recorded module output
        (or a constant).
        """

        def through(node: Any) -> list[Any] | None:
            nexts = [n for n, _ in node.next_functions]
            name = node.name()
            if name in _SUMS or (name == "MulBackward0" and sum(n is not None for n in nexts) == 1):
                return nexts
            return nexts[:1] if name in _SHAPE_OPS and nexts else None

        return self._walk(tensor, through)

    def sources(self, tensor: Tensor) -> list[str] | None:
        """The recorded modules whose outputs ``tensor`` was computed from, through any
        operations (the first recorded output on each path back); None where the graph is
        larger than the walk allows (unknown).

        Example:
            >>> import torch
            >>> from torch_momentum.balance._symmetry_trace import CallRecorder, DataFlow
            >>> model = torch.nn.ModuleDict({k: torch.nn.Linear(2, 2) for k in "ab"})
            >>> x = torch.randn(3, 2)
            >>> with CallRecorder(model) as rec:
            ...     y = model["b"](model["a"](x).softmax(-1) * 2)
            >>> DataFlow(rec.calls).sources(rec.calls[1].inputs[0])
            ['a']
        """
        return self._walk(tensor, lambda node: [n for n, _ in node.next_functions])

    def _walk(self, tensor: Tensor, through: Callable[[Any], list[Any] | None]) -> list[str] | None:
        """The modules whose recorded outputs end the paths back from ``tensor`` through the
        autograd nodes ``through`` follows (it gives the next nodes, or None to give up); None
        where it gives up or the graph exceeds the walk limit."""
        found: set[str] = set()
        stack, seen = [tensor.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if len(seen) > _WALK_LIMIT:
                return None
            if node in self._owners:
                found.add(self._owners[node][0])
                continue
            nexts = through(node)
            if nexts is None:
                return None
            stack += nexts
        return sorted(found)
