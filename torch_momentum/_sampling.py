"""Gradient sampling machinery shared by :mod:`~torch_momentum.clarke`,
:mod:`~torch_momentum.stationarity` and the StationarityMonitor: flattening of tensors and dicts
of tensors, argument checks, the check that ``f`` depends on ``x`` through autograd, and
gradients at many points (batched with ``torch.func.vmap``, or a Python loop of
``torch.autograd.grad`` calls).

Numbers may come as Python numbers, one-element tensors or numpy scalars and arrays (numpy is
recognised by duck typing: this package does not import it).
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard, Union

import torch
from torch import Tensor

from torch_momentum.minnorm import scaled_norm

TensorOrDict = Union[Tensor, dict[str, Tensor]]  # noqa: UP007  (used at runtime in dataclasses)

# Default number of samples: 2 (d + 1), clamped to [MIN_SAMPLES, MAX_SAMPLES].
MIN_SAMPLES = 64
MAX_SAMPLES = 256

#: Where :func:`~torch_momentum.stationarity_profile` keeps the sampled gradients.
MEMORY_MODES = ("device", "host", "recompute")


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
    names = None if isinstance(x, Tensor) else tuple(str(name) for name, _ in items)
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
    if isinstance(tree, Tensor):
        return tree.reshape(k, -1)
    assert spec.names is not None  # a dict tree comes from a dict x
    return torch.cat([tree[name].reshape(k, -1) for name in spec.names], dim=1)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


class _ArrayLike(Protocol):
    def reshape(self, *shape: int) -> _ArrayLike: ...
    def tolist(self) -> Any: ...


def _is_array(value: object) -> TypeGuard[_ArrayLike]:
    """A tensor or an array of another library (numpy, ...): has ``__array__``, ``reshape`` and
    ``tolist``, and is not a string."""
    return isinstance(value, Tensor) or (
        not isinstance(value, (str, bytes))
        and hasattr(value, "__array__")
        and hasattr(value, "reshape")
        and hasattr(value, "tolist")
    )


def plain_number(value: object) -> object:
    """A one-element tensor or array (a numpy 0-d array, ``np.array([0.1])``) as the Python
    number it holds; anything else unchanged (the caller's type check names it)."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value
    if _is_array(value) and getattr(value, "size", None) == 1:
        return value.reshape(-1).tolist()[0]
    return value


def check_radius(radius: object, name: str = "radius") -> float:
    """A positive finite real number (Python, numpy, a one-element tensor or array) as a float."""
    radius = plain_number(radius)
    if isinstance(radius, (bool,)) or not isinstance(radius, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(radius).__name__}")
    value = float(radius)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a positive finite number, got {name}={value}")
    return value


def check_radii(radii: object) -> tuple[float, ...]:
    """Radii: a sequence, a tensor or an array (numpy; any shape, read in order), or one number
    (a 0-d array too), as a tuple of positive floats."""
    if _is_array(radii):
        radii = radii.reshape(-1).tolist()
    elif isinstance(radii, numbers.Real) and not isinstance(radii, bool):
        radii = [radii]
    if isinstance(radii, (str, bytes)) or not isinstance(radii, Sequence):
        raise TypeError(f"radii must be a sequence of positive numbers, got {type(radii).__name__}")
    if len(radii) == 0:
        raise ValueError("radii is empty; pass at least one radius delta > 0")
    return tuple(check_radius(r, f"radii[{i}]") for i, r in enumerate(radii))


def check_num_samples(num_samples: object, d: int) -> int:
    """An integer >= 1 (Python or numpy integer, a 0-d integer array), or the default
    ``2 (d + 1)`` in [64, 256]."""
    if num_samples is None:
        return max(MIN_SAMPLES, min(2 * (d + 1), MAX_SAMPLES))
    num_samples = plain_number(num_samples)
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
    return math.sqrt(eps) * max(1.0, scaled_norm(flat))  # no overflow for entries of 1e160


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


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take: on CUDA the free memory plus what torch's
    caching allocator holds unused; on the CPU ``MemAvailable`` of ``/proc/meminfo`` (Linux),
    else the physical memory, and at most what the process's cgroup (v2) limit leaves, as in a
    container; ``None`` where unknown (other devices)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    have = _meminfo_available()
    if have is None:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, OSError, ValueError):
            return None
    limit = _cgroup_headroom()
    return have if limit is None else min(have, limit)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's cgroup minus its use (cgroup v2 ``memory.max`` and
    ``memory.current``, or v1 ``memory.limit_in_bytes`` and ``memory.usage_in_bytes``); None
    without a limit or where none can be read."""
    try:
        with open(cgroup) as f:
            lines = [line.strip().split(":", 2) for line in f]
    except OSError:
        return None
    candidates = []
    for _, controllers, path in (line for line in lines if len(line) == 3):
        if controllers == "":  # v2
            base = os.path.join(root, path.lstrip("/"))
            candidates.append((base, "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):  # v1
            memory = os.path.join(root, "memory")
            for base in (os.path.join(memory, path.lstrip("/")), memory):
                candidates.append((base, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    for base, limit_file, use_file in candidates:
        try:
            with open(os.path.join(base, limit_file)) as f:
                limit = f.read().strip()
            with open(os.path.join(base, use_file)) as f:
                use = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**62:  # no limit (v1 writes a huge number)
            return None
        return max(0, int(limit) - use)
    return None


def sample_bytes(k: int, d: int, dtype: torch.dtype) -> int:
    """Peak bytes of one :func:`~torch_momentum.clarke_subgradient` call beyond ``f``'s own:
    three ``k x d`` arrays of ``dtype`` (directions, points, gradients), the float64 ``k x d``
    copies of the min-norm solve (the rows scaled by a power of two and its temporary; a third,
    the conversion, for other dtypes than float64) and two float64 ``k x k`` matrices (the Gram
    matrix and the solver's normalised copy)."""
    copies = 2 if dtype == torch.float64 else 3
    return 3 * k * d * dtype.itemsize + copies * k * d * 8 + 2 * k * k * 8


def check_sample_memory(
    k: int, d: int, dtype: torch.dtype, device: torch.device, caller: str
) -> None:
    """A ``RuntimeError`` naming ``num_samples`` when the sampling and the min-norm solve of
    ``k`` samples of ``d`` numbers of ``dtype`` (:func:`sample_bytes`) exceed the memory
    available on ``device`` (:func:`available_memory`), checked before anything is allocated: a
    clear message instead of an allocator error part way through or, on the CPU, the process
    being killed."""
    need = sample_bytes(k, d, dtype)
    have = available_memory(device)
    if have is not None and need > have:
        raise RuntimeError(
            f"{caller}: num_samples={k} samples of the {d} entries of x need about "
            f"{need / 2**30:.3g} GiB (three {k} x {d} arrays of {dtype}, the min-norm solve's "
            f"float64 copies and {k} x {k} matrices), more than the {have / 2**30:.3g} GiB "
            "available on "
            f"{device}; pass a smaller num_samples, or use stationarity_profile, which samples "
            "in blocks (chunk_size, memory)"
        )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # torch_momentum/


def user_stacklevel() -> int:
    """The ``stacklevel`` at which a ``warnings.warn`` in the calling function names the first
    frame outside this package: the user's call of the public function, however deep inside
    the package the warning is raised."""
    level, frame = 1, sys._getframe(1)  # level 1: the function that calls warnings.warn
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


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


# torch's warning when vmap has no batching rule for an operation and runs it one sample at a
# time (e.g. aten::lstm in torch 2.13): "There is a performance drop because we have not yet
# implemented the batching rule for aten::lstm.input. Please file us an issue on GitHub ..."
_NO_BATCHING_RULE = re.compile(r"not yet implemented the batching rule for ([\w:.]*\w)")
# The loop replaces vmap only when it is faster by this factor (timings on a shared machine are
# noisy; a wrong choice costs speed, never correctness).
_LOOP_MARGIN = 1.5
# Below this many seconds for the first block vectorised, the loop could save little: no timing
# (a certificate that samples a few dozen gradients would otherwise pay 4-12 extra ones).
_MIN_SECONDS_TO_COMPARE = 0.05
# Points of the first block timed in the loop (and again vectorised: the first vmap call of a
# process carries a one-time cost of about a second).
_TIMED_POINTS = 4


def _timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


class GradientSampler:
    """Gradients of ``f`` at batches of flat points: vmapped while that pays, else a loop.

    The first block decides (one warning when it chooses the loop; ``caller`` names the public
    function in it): the loop of ``torch.autograd.grad`` calls replaces vmap for good when vmap
    fails with an error that is not out-of-memory, when torch warns that it has no batching rule
    for an operation of ``f`` (vmap then runs that operation one sample at a time, slower than the
    loop), or when the loop is faster by ``_LOOP_MARGIN`` both on the whole first block (estimated
    from its first points) and on those points vectorised again (timed only when the first block
    took at least ``_MIN_SECONDS_TO_COMPARE`` seconds).
    """

    def __init__(
        self, f_scalar: Callable[..., Tensor], spec: Spec, vectorize: bool, caller: str
    ) -> None:
        self.f_scalar, self.spec, self.vectorize, self.caller = f_scalar, spec, vectorize, caller
        self._decided = not vectorize

    def __call__(self, points: Tensor) -> Tensor:
        if self.vectorize:
            try:
                if not self._decided:
                    return self._first_block(points)
                return grads_vmap(self.f_scalar, points, self.spec)
            except (RuntimeError, NotImplementedError) as err:
                if is_oom(err):
                    raise
                reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                self._use_loop(
                    f"f cannot be vmapped ({type(err).__name__}: {reason}). Typical causes: "
                    "in-place updates of tensors that are not batched, .item() or data-dependent "
                    "Python control flow, BatchNorm in training mode, random operations"
                )
        return grads_loop(self.f_scalar, points, self.spec)

    def _use_loop(self, why: str) -> None:
        self.vectorize, self._decided = False, True
        warnings.warn(
            f"{self.caller}: {why}; using a Python loop of torch.autograd.grad calls instead of "
            "torch.func.vmap. Pass vectorize=False to use the loop without this check",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def _first_block(self, points: Tensor) -> Tensor:
        """vmap on the first block, then the decision; an error (out of memory: the caller may
        retry with fewer points) leaves the sampler undecided."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, t_vmap = _timed(lambda: grads_vmap(self.f_scalar, points, self.spec))
        ops: list[str] = []
        for w in caught:  # torch's no-batching-rule warnings are ours to explain; others pass
            match = _NO_BATCHING_RULE.search(str(w.message))
            if match:
                ops.append(match.group(1))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if ops:
            names = ", ".join(sorted(set(ops)))
            self._use_loop(
                f"torch.func.vmap has no batching rule for {names} and runs it one sample at a "
                "time, slower than a loop (torch warns of a performance drop)"
            )
        else:
            self._compare_with_loop(points, t_vmap)
        self._decided = True
        return out

    def _compare_with_loop(self, points: Tensor, t_vmap: float) -> None:
        n = points.shape[0]
        m = min(_TIMED_POINTS, n)
        if n < 2 * m or t_vmap < _MIN_SECONDS_TO_COMPARE:  # too few points, or too little time
            return
        few = points[:m]
        _, t_loop = _timed(lambda: grads_loop(self.f_scalar, few, self.spec))
        if t_loop / m * n * _LOOP_MARGIN >= t_vmap:
            return
        # the first vmap call may carry one-time costs: both again on the same few points, the
        # faster of two runs each (a descheduled run on a shared machine does not decide)
        t_vmap_few = min(_timed(lambda: grads_vmap(self.f_scalar, few, self.spec))[1] for _ in "ab")
        t_loop = min(t_loop, _timed(lambda: grads_loop(self.f_scalar, few, self.spec))[1])
        if t_loop * _LOOP_MARGIN >= t_vmap_few:
            return
        self._use_loop(
            f"the loop is faster here: the first {n} gradients took {t_vmap:.3g} s vectorised "
            f"against about {t_loop / m * n:.3g} s in a loop, and {m} of them {t_vmap_few:.3g} s "
            f"against {t_loop:.3g} s"
        )
