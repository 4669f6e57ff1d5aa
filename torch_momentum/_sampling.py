"""Gradient sampling machinery shared by :mod:`~torch_momentum.clarke` and
:mod:`~torch_momentum.stationarity`: flattening of tensors and dicts of tensors, argument checks,
the check that ``f`` depends on ``x`` through autograd, and gradients at many points (batched with
``torch.func.vmap``, or a Python loop of ``torch.autograd.grad`` calls).
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

TensorOrDict = Union[Tensor, dict[str, Tensor]]  # noqa: UP007  (used at runtime in dataclasses)

# Default number of samples: 2 (d + 1), clamped to [MIN_SAMPLES, MAX_SAMPLES].
MIN_SAMPLES = 64
MAX_SAMPLES = 256


# --------------------------------------------------------------------------------------------
# Flattening of tensors and dicts of tensors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    names: tuple[str, ...] | None  # None: x was a single tensor
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]


def check_x(x: object) -> tuple[Spec, Tensor]:
    """Validate ``x`` and return its spec and a detached flat copy (``x`` is never mutated)."""
    if isinstance(x, Tensor):
        items: list[tuple[str | None, Tensor]] = [(None, x)]
    elif isinstance(x, Mapping):
        if len(x) == 0:
            raise ValueError("x is an empty dict; it must map names to floating-point tensors")
        items = []
        for name, value in x.items():
            if not isinstance(name, str):
                raise TypeError(f"x must have str keys, got key {name!r} of type {type(name)}")
            if not isinstance(value, Tensor):
                raise TypeError(f"x[{name!r}] must be a Tensor, got {type(value).__name__}")
            items.append((name, value))
    else:
        raise TypeError(f"x must be a Tensor or a dict of name -> Tensor, got {type(x).__name__}")
    first = items[0][1]
    for name, value in items:
        label = "x" if name is None else f"x[{name!r}]"
        if not value.dtype.is_floating_point:
            raise TypeError(
                f"{label} must be a real floating-point tensor, got dtype {value.dtype}; "
                "Clarke subgradients are defined for real functions of real variables"
            )
        if value.dtype != first.dtype or value.device != first.device:
            raise TypeError(
                f"all tensors of x must share one dtype and device; {label} is "
                f"{value.dtype} on {value.device}, the first is {first.dtype} on {first.device}"
            )
        if value.layout != torch.strided:
            raise TypeError(f"{label} must be a dense (strided) tensor, got {value.layout}")
    flat = torch.cat([value.detach().reshape(-1) for _, value in items])
    if flat.numel() == 0:
        raise ValueError("x has no entries; there is nothing to differentiate")
    names = None if isinstance(x, Tensor) else tuple(name for name, _ in items)  # type: ignore[misc]
    spec = Spec(
        names=names,
        shapes=tuple(value.shape for _, value in items),
        numels=tuple(value.numel() for _, value in items),
    )
    return spec, flat


def unflatten(flat: Tensor, spec: Spec, lead: tuple[int, ...] = ()) -> TensorOrDict:
    """Inverse of the flattening, with optional leading (batch) dimensions."""
    if spec.names is None:
        return flat.reshape((*lead, *spec.shapes[0]))
    parts = flat.split(list(spec.numels), dim=-1)
    return {
        name: part.reshape((*lead, *shape))
        for name, part, shape in zip(spec.names, parts, spec.shapes, strict=True)
    }


def flatten_batch(tree: TensorOrDict, spec: Spec, k: int) -> Tensor:
    if spec.names is None:
        return tree.reshape(k, -1)  # type: ignore[union-attr]
    return torch.cat([tree[name].reshape(k, -1) for name in spec.names], dim=1)  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def check_radius(radius: object, name: str = "radius") -> float:
    """A positive finite real number (Python, numpy or one-element tensor) as a float."""
    if isinstance(radius, Tensor) and radius.numel() == 1 and not radius.dtype.is_complex:
        radius = float(radius)
    if isinstance(radius, (bool,)) or not isinstance(radius, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(radius).__name__}")
    value = float(radius)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a positive finite number, got {name}={value}")
    return value


def check_num_samples(num_samples: object, d: int) -> int:
    """An integer >= 1 (Python or numpy integer), or the default ``2 (d + 1)`` in [64, 256]."""
    if num_samples is None:
        return max(MIN_SAMPLES, min(2 * (d + 1), MAX_SAMPLES))
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    k = operator.index(num_samples)
    if k < 1:
        raise ValueError(f"num_samples must be >= 1, got num_samples={k}")
    return k


def check_common(f: object, generator: object, vectorize: object) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(vectorize, bool):
        raise TypeError(f"vectorize must be a bool, got {type(vectorize).__name__}")


def default_radius(flat: Tensor) -> float:
    eps = torch.finfo(flat.dtype).eps
    return math.sqrt(eps) * max(1.0, float(flat.double().norm()))


def check_value(value: object) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"f must return a real scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"f must return a real scalar tensor, got a tensor of shape {tuple(value.shape)}; "
            "reduce it (e.g. .sum() or .mean()) inside f"
        )
    if not value.dtype.is_floating_point:
        raise TypeError(f"f must return a real scalar tensor, got dtype {value.dtype}")


def scalar_output(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def f_scalar(z: TensorOrDict) -> Tensor:
        return f(z).reshape(())

    return f_scalar


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def _leaves(point: Tensor, spec: Spec) -> tuple[list[Tensor], TensorOrDict]:
    leaves = [part.detach().clone().requires_grad_(True) for part in point.split(list(spec.numels))]
    if spec.names is None:
        return leaves, leaves[0].reshape(spec.shapes[0])
    z = {n: t.reshape(s) for n, t, s in zip(spec.names, leaves, spec.shapes, strict=True)}
    return leaves, z


def _disconnected(where: str) -> ValueError:
    return ValueError(
        f"f({where}) does not depend on x through autograd: its value has no autograd graph "
        "connecting it to x, so every sampled gradient would be 0 and the certificate a false "
        "'stationary'. Compute f with differentiable torch operations on its argument (no "
        ".item()/.tolist()/.detach()/torch.tensor(...) of values derived from it)"
    )


def grad_at(f: Callable[..., Tensor], point: Tensor, spec: Spec) -> tuple[Tensor, Tensor]:
    """``f`` and its autograd gradient at one flat ``point``.

    Raises ValueError when the value does not depend on ``point`` through autograd (no graph, or
    every input unused): sampling such an ``f`` would give zero gradients, a false certificate.
    """
    leaves, z = _leaves(point, spec)
    with torch.enable_grad():
        value = f(z)
        check_value(value)
        if not value.requires_grad:
            raise _disconnected("x")
        grads = torch.autograd.grad(value.reshape(()), leaves, allow_unused=True)
    if all(g is None for g in grads):
        raise _disconnected("x")
    flat = torch.cat(
        [
            torch.zeros_like(leaf) if g is None else g.reshape(-1)
            for leaf, g in zip(leaves, grads, strict=True)
        ]
    )
    return value.detach(), flat


def grads_vmap(f_scalar: Callable[..., Tensor], points: Tensor, spec: Spec) -> Tensor:
    """``vmap(grad(f))`` over the sample points; halves the chunk size on out-of-memory."""
    k = points.shape[0]
    tree = unflatten(points, spec, (k,))
    grad_fn = torch.func.grad(f_scalar)
    chunk: int | None = None
    while True:
        try:
            out = torch.func.vmap(grad_fn, chunk_size=chunk)(tree)
            return flatten_batch(out, spec, k)
        except RuntimeError as err:
            if not is_oom(err) or chunk == 1:
                raise
            chunk = max(1, (k if chunk is None else chunk) // 2)


def grads_loop(f_scalar: Callable[..., Tensor], points: Tensor, spec: Spec) -> Tensor:
    """One ``torch.autograd.grad`` call per sample point."""
    out = torch.empty_like(points)
    for i in range(points.shape[0]):
        leaves, z = _leaves(points[i], spec)
        with torch.enable_grad():
            value = f_scalar(z)
            if not value.requires_grad:
                raise _disconnected("a sample point")
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        out[i] = torch.cat(
            [
                torch.zeros_like(leaf) if g is None else g.reshape(-1)
                for leaf, g in zip(leaves, grads, strict=True)
            ]
        )
    return out


class GradientSampler:
    """Gradients of ``f`` at batches of flat points: vmapped while ``f`` allows it, else a loop.

    The first vmap failure that is not out-of-memory switches to the loop for good, with one
    warning that says why (``caller`` names the public function in it).
    """

    def __init__(
        self, f_scalar: Callable[..., Tensor], spec: Spec, vectorize: bool, caller: str
    ) -> None:
        self.f_scalar, self.spec, self.vectorize, self.caller = f_scalar, spec, vectorize, caller

    def __call__(self, points: Tensor) -> Tensor:
        if self.vectorize:
            try:
                return grads_vmap(self.f_scalar, points, self.spec)
            except (RuntimeError, NotImplementedError) as err:
                if is_oom(err):
                    raise
                self.vectorize = False
                reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                warnings.warn(
                    f"{self.caller}: f cannot be vmapped ({type(err).__name__}: {reason}); "
                    "falling back to a Python loop of torch.autograd.grad calls, which is "
                    "slower. Typical causes: in-place updates of tensors that are not batched, "
                    ".item() or data-dependent Python control flow, BatchNorm in training mode, "
                    "random operations. Pass vectorize=False to use the loop without this warning",
                    UserWarning,
                    stacklevel=3,
                )
        return grads_loop(self.f_scalar, points, self.spec)
