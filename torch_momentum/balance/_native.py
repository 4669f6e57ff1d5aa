r"""A step's per-row reductions in one pass over the tensors: a small C kernel.

Every step the ledger reduces the slots :math:`(x, v, g)` of each tracked tensor to the
:math:`3 \times 3` Gram matrix :math:`G_r = \sum_{i \in r} s_i s_i^\top`,
:math:`s_i = (x_i, v_i, g_i)`, of every row :math:`r` (a unit's entries in one tensor: an output
channel, a column, a whole vector) and, for linear charges, to the sums
:math:`\sum_{i \in r} s_i`. In torch that takes a copy or a stack of the slots and one to three
kernels per row length or per group of equally shaped tensors; on a CPU, a model of many small
tensors pays mostly for their dispatch, a large one for the copies. The kernel of ``_rows.c``
reads each slot once where it lies and accumulates every row's entries in float64: one call a
step, with no copy.

It is compiled the first time a ledger on the CPU needs it, with the system's C compiler
(``$CC``, which may carry arguments, e.g. ``ccache gcc``; else ``cc``, ``gcc`` or ``clang``; C99,
under a second), into ``$TORCH_MOMENTUM_CACHE_DIR`` (default
``$XDG_CACHE_HOME/torch_momentum`` or ``~/.cache/torch_momentum``), named by a digest of the
source, the compiler and its flags; processes that build it at once (the ranks of one job) each
write their own file and rename it into place. Where no compiler is found, the build fails, or
``TORCH_MOMENTUM_NATIVE=0`` is set, :func:`library` is None and the ledger keeps its torch paths
(the same values up to round-off; the reason is logged once at INFO level).

Private module: the names here are shared by the ledger's modules, not user API.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from torch_momentum.balance._flat import RowIndex

_log = logging.getLogger(__name__)

#: the kernel's source, shipped with the package
SOURCE = Path(__file__).with_name("_rows.c")
#: the compiler's flags: C99, optimised, position-independent shared code; sums may be
#: reassociated (vectorised), every one of them accumulated in float64
FLAGS = (
    "-std=c99",
    "-O3",
    "-fPIC",
    "-shared",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
)
#: set to ``0`` to keep the ledger on its torch paths
ENV_SWITCH = "TORCH_MOMENTUM_NATIVE"
#: where the compiled kernel is kept (default: the user's cache directory)
ENV_CACHE = "TORCH_MOMENTUM_CACHE_DIR"
_FUNCTIONS = {torch.float32: "tm_rows_f32", torch.float64: "tm_rows_f64"}
_ARGTYPES = [
    ctypes.c_void_p,  # slots: 3K pointers, every x, then every v, then every g
    ctypes.c_int64,  # K
    ctypes.c_void_p,  # uses: (U, 7) int64
    ctypes.c_int64,  # U
    ctypes.c_void_p,  # gram: (rows, 9) float64
    ctypes.c_void_p,  # sums: (rows, 3) float64
]


def cache_dir() -> Path:
    """Where the compiled kernel is kept."""
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torch_momentum"


def compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` (split as a shell would: ``ccache gcc`` is two words),
    else the first of ``cc``, ``gcc``, ``clang`` on the ``PATH``; None where there is none (on
    macOS, also where the command line tools are not installed: ``cc`` is then a stub that asks
    to install them)."""
    named = shlex.split(os.environ.get("CC", ""))
    if named:
        found = shutil.which(named[0])
        return None if found is None else [found, *named[1:]]
    if platform.system() == "Darwin" and not _xcode_tools():
        return None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found is not None:
            return [found]
    return None


def _xcode_tools() -> bool:
    """Whether macOS's command line tools are installed (``xcode-select -p`` succeeds)."""
    try:
        done = subprocess.run(["xcode-select", "-p"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def build(cc: Sequence[str], directory: Path) -> Path:
    """Compile :data:`SOURCE` with the command ``cc`` into ``directory`` (once: an existing build
    of the same source, compiler command and flags is reused); the shared library's path.

    Raises:
        RuntimeError: the compiler failed or did not finish in 120 s (its output in the message).
        OSError: ``directory`` cannot be created or written.
    """
    source = SOURCE.read_bytes()
    key = "\0".join([*cc, *FLAGS, platform.system(), platform.machine()]).encode()
    target = directory / f"rows-{hashlib.sha256(source + key).hexdigest()[:20]}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # a name of this build's own, created by the linker (with the mode the umask gives, readable
    # by whoever shares the cache), then moved into place at once: a concurrent build's rename
    # is as good as this one
    tmp = directory / f".rows-{os.getpid()}-{secrets.token_hex(8)}.so"
    try:
        try:
            done = subprocess.run(
                [*cc, *FLAGS, "-o", str(tmp), str(SOURCE)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"`{shlex.join(cc)}` did not compile {SOURCE.name} in 120 s"
            ) from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"`{shlex.join(cc)}` failed on {SOURCE.name} (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load(path: Path) -> ctypes.CDLL:
    """The kernel's shared library at ``path``, its functions typed."""
    lib = ctypes.CDLL(str(path))
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    lib.tm_unit_sum.argtypes = [
        ctypes.c_void_p,  # src: (entries,) int64
        ctypes.c_void_p,  # dst: (entries,) int64
        ctypes.c_void_p,  # factor: (entries,) float64
        ctypes.c_int64,  # entries
        ctypes.c_void_p,  # values: (rows, width) float64
        ctypes.c_int64,  # width
        ctypes.c_void_p,  # out: (units, width) float64
        ctypes.c_int64,  # units
    ]
    lib.tm_unit_sum.restype = None
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be had (see the module)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        _log.info("torch_momentum: the ledger's C kernel is off (%s=0)", ENV_SWITCH)
        return None
    cc = compiler()
    if cc is None:
        _log.info("torch_momentum: no C compiler ($CC, cc, gcc, clang): the ledger's torch paths")
        return None
    try:
        path = build(cc, cache_dir())
        try:
            return load(path)
        except OSError:  # a damaged file in the cache: built once more
            path.unlink(missing_ok=True)
            return load(build(cc, cache_dir()))
    except (OSError, RuntimeError) as exc:
        _log.info("torch_momentum: the ledger's C kernel is not available: %s", exc)
        return None


def pointers(
    tensors: Iterable[Tensor], shapes: Iterable[torch.Size], dtype: torch.dtype
) -> list[int] | None:
    """The data pointers of ``tensors`` where the kernel can read each as a plain array of
    ``dtype`` and its shape in ``shapes``: a dense, contiguous CPU tensor, with memory behind it
    (a ZeroTensor or fake tensor has none) and no pending negation (a neg-bit view's memory
    holds ``-t``); None where one cannot be read so."""
    found = []
    for t, shape in zip(tensors, shapes, strict=True):
        if not (
            t.dtype is dtype
            and t.shape == shape
            and t.is_cpu
            and t.layout is torch.strided
            and t.is_contiguous()
            and not t.is_neg()
        ):
            return None
        found.append(t.data_ptr())
    return found if all(found) else None


def supports(slots: Iterable[Tensor], dtype: torch.dtype) -> bool:
    """Whether the kernel can read ``slots`` (:func:`pointers`), the kernel available for
    ``dtype`` (float32 or float64). Accelerator tensors never build it."""
    slots = list(slots)
    if dtype not in _FUNCTIONS or not all(t.is_cpu for t in slots) or library() is None:
        return False
    return pointers(slots, [t.shape for t in slots], dtype) is not None


class NativeRows(RowIndex):
    """The per-row Gram matrices and sums of the slots of many tensors, in one pass.

    The interface of :class:`~torch_momentum.balance._flat.FlatRows` (``shapes``, ``uses``, the
    rows' places of :class:`~torch_momentum.balance._flat.RowIndex`, a call with the slots), with
    :attr:`gram` in float64 whatever the slots' dtype: the kernel accumulates in float64.

    Args:
        shapes: per tensor ``k``, its shape (every tensor non-empty).
        uses: ``(k, dim, linear)`` for every way a tensor is read: its rows along ``dim`` (the
            slices at each index of ``dim``), as Gram matrices (``linear`` False) or as sums.
        dtype: the slots' dtype (float32 or float64); they must be contiguous and on the CPU
            (:func:`supports`).

    Example:
        >>> import torch
        >>> from torch_momentum.balance._native import NativeRows, library
        >>> a, b = torch.ones(2, 3), torch.arange(4.0)
        >>> if library() is not None:  # a C compiler is at hand
        ...     rows = NativeRows([(2, 3), (4,)], [(0, 1, False), (1, 0, True)], torch.float32)
        ...     assert rows([a, b, 2 * a, b, a, b])  # x of both tensors, then v, then g
        ...     first, sums = rows.first(0, 1), rows.first_sum(1, 0)
        ...     assert rows.gram[first : first + 3, 0, 1].tolist() == [4.0] * 3  # <a, 2a>
        ...     assert rows.sums[sums : sums + 4, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        uses: Iterable[tuple[int, int, bool]],
        dtype: torch.dtype,
    ) -> None:
        lib = library()
        if lib is None or dtype not in _FUNCTIONS:
            raise RuntimeError(f"the ledger's C kernel is not available for dtype {dtype}")
        self.shapes = [torch.Size(s) for s in shapes]
        numel = [math.prod(s) for s in self.shapes]
        if not all(numel):
            raise ValueError(f"`shapes`: every tensor must be non-empty, got {shapes}")
        super().__init__()
        self.dtype = dtype
        uses = list(dict.fromkeys(uses))
        for k, dim, _ in uses:
            if not 0 <= k < len(self.shapes):
                raise ValueError(f"`uses`: tensor {k} is not one of the {len(shapes)} tensors")
            ndim = max(1, len(self.shapes[k]))  # a 0-dim tensor: one row of one entry
            if not 0 <= dim < ndim:
                raise ValueError(f"`uses`: dim {dim} of tensor {k} of shape {tuple(shapes[k])}")
        # a tensor's Gram rows along dim 1 and along dim 0: one pass over it gives both
        both = {k for k, dim, linear in uses if dim == 1 and not linear} & {
            k for k, dim, linear in uses if dim == 0 and not linear
        }
        rows = {False: 0, True: 0}
        table = []
        for k, dim, linear in uses:
            if dim == 0 and not linear and k in both:
                continue  # read with dim 1
            shape = self.shapes[k] or torch.Size([1])
            pre, n = math.prod(shape[:dim]), shape[dim]
            lead = -1
            if dim == 1 and not linear and k in both:
                lead = rows[False]
                self.place(k, 0, False, lead, pre)
                rows[False] += pre
            self.place(k, dim, linear, rows[linear], n)
            table.append((k, pre, n, numel[k] // (pre * n), int(linear), rows[linear], lead))
            rows[linear] += n
        self._uses = torch.tensor(table, dtype=torch.int64).reshape(-1, 7)
        #: ``(rows, 3, 3)``: the Gram matrix of every row read as one (float64)
        self.gram = torch.zeros(rows[False], 3, 3, dtype=torch.float64)
        #: ``(rows, 3)``: the slots' sums of every row read as such (float64)
        self.sums = torch.zeros(rows[True], 3, dtype=torch.float64)
        self._fn = getattr(lib, _FUNCTIONS[dtype])
        self._slot_shapes = self.shapes * 3
        self._pointers = (ctypes.c_void_p * len(self._slot_shapes))()
        self._args = (
            len(self.shapes),
            self._uses.data_ptr(),
            len(table),
            self.gram.data_ptr(),
            self.sums.data_ptr(),
        )

    def __call__(self, slots: Sequence[Tensor]) -> bool:
        """Reduce the step's slots: ``x`` of every tensor in order, then ``v``, then ``g``.

        Returns False, computing nothing, where the kernel can no longer read a slot as planned
        (:func:`pointers`; the caller plans again): it reads the memory the plan describes, so
        every slot is checked, every step.
        """
        found = pointers(slots, self._slot_shapes, self.dtype)
        if found is None:
            return False
        self._pointers[:] = cast(list[ctypes.c_void_p | int | None], found)
        if self._fn(self._pointers, *self._args):
            raise MemoryError("the ledger's C kernel could not allocate its row accumulators")
        return True


class NativeUnitSum:
    r"""``out = A @ values`` by the C kernel: row ``src[i]`` of ``values``, times ``factor[i]``,
    summed into row ``dst[i]`` of ``out``, for every entry ``i`` (the interface of
    :class:`~torch_momentum.balance._unit_sum.UnitSum`, for float64 CPU tensors). One loop over
    the entries, with no dispatch: the ledger's sums of the kernel's rows into the units.

    Args:
        src: ``(entries,)`` integer rows of ``values``, each below ``rows``.
        dst: ``(entries,)`` integer rows of ``out`` (the units), each below ``units``.
        factor: ``(entries,)`` float64 factors.
        units: rows of ``out``.
        rows: rows of ``values``.

    Raises:
        ValueError: an index out of range, or arguments of different lengths.
        RuntimeError: the kernel is not available.
    """

    def __init__(self, src: Tensor, dst: Tensor, factor: Tensor, units: int, rows: int) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the ledger's C kernel is not available")
        if not (src.shape == dst.shape == factor.shape and src.dim() == 1):
            raise ValueError(
                "`src`, `dst` and `factor` must be one-dimensional of one length, got shapes"
                f" {tuple(src.shape)}, {tuple(dst.shape)}, {tuple(factor.shape)}"
            )
        for name, index, bound in (("src", src, rows), ("dst", dst, units)):
            if len(index) and not (0 <= int(index.min()) and int(index.max()) < bound):
                raise ValueError(f"`{name}`: indices must lie in [0, {bound}), got {index}")
        self.units, self.rows, self.entries = units, rows, len(src)
        self._src = src.to("cpu", torch.int64).contiguous()
        self._dst = dst.to("cpu", torch.int64).contiguous()
        self._factor = factor.to("cpu", torch.float64).contiguous()
        self._fn = lib.tm_unit_sum
        self._args = (self._src.data_ptr(), self._dst.data_ptr(), self._factor.data_ptr())

    def __call__(self, values: Tensor, out: Tensor) -> Tensor:
        """Write ``A @ values`` into ``out`` (``(units, width)``) and return it; ``values`` is
        ``(rows, width)``; both float64, contiguous, on the CPU."""
        if self.entries == 0:  # no rows into no units (the buffers may have no memory)
            return out.zero_()
        width = values.shape[-1]
        found: list[int] = []
        for name, t, shape in (
            ("values", values, (self.rows, width)),
            ("out", out, (self.units, width)),
        ):
            pointer = pointers([t], [torch.Size(shape)], torch.float64)
            if pointer is None:
                raise ValueError(
                    f"`{name}` must be a contiguous float64 CPU tensor of shape {shape}, got"
                    f" {t.dtype} {tuple(t.shape)} on {t.device}"
                )
            found += pointer
        src, dst, factor = self._args
        self._fn(src, dst, factor, self.entries, found[0], width, found[1], self.units)
        return out
