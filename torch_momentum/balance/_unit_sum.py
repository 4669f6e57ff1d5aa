r"""Rows of per-row values summed into units, each times a fixed factor.

Every step the ledger sums per-row values (the Gram entries or sums of each row, or their ledger
terms) into the units of the charges: :math:`\mathrm{out}_{d_i} \mathrel{+}= f_i \,
\mathrm{values}_{s_i}` for every entry :math:`i` of a fixed index, that is
:math:`\mathrm{out} = A\, \mathrm{values}` with :math:`A` the fixed ``(units, rows)`` matrix
:math:`A_{d_i s_i} = \sum f_i`. On the CPU, ``index_add_`` into rows of several columns adds one
slice after the other: for 1,664 rows of 9 float64 values into 1,196 units (GPT-2 tiny) the
gather, factors and ``index_add_`` took 137 µs against 12 µs for one product by :math:`A` in
CSR form. Other devices keep the gather, the factors and ``index_add_`` (atomic adds on a GPU).

Private module: the names here are shared by the ledger's modules, not user API.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


class UnitSum:
    r"""``out = A @ values``: row ``src[i]`` of ``values``, times ``factor[i]``, summed into row
    ``dst[i]`` of ``out``, for every entry ``i``.

    Args:
        src: ``(entries,)`` integer rows of ``values``.
        dst: ``(entries,)`` integer rows of ``out`` (the units).
        factor: ``(entries,)`` float64 factors.
        units: rows of ``out``.
        rows: rows of ``values``.
        sparse: sum by a CSR matrix product (the default on the CPU, where the build has
            one) or by ``index_add_`` (elsewhere).

    Example:
        >>> import torch
        >>> from torch_momentum.balance._unit_sum import UnitSum
        >>> f = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
        >>> sum_ = UnitSum(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), f, 2, 2)
        >>> values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> sum_(values, torch.empty(2, 2, dtype=torch.float64))
        tensor([[-2., -2.],
                [ 6.,  8.]], dtype=torch.float64)
    """

    def __init__(
        self,
        src: Tensor,
        dst: Tensor,
        factor: Tensor,
        units: int,
        rows: int,
        *,
        sparse: bool | None = None,
    ) -> None:
        if not (src.shape == dst.shape == factor.shape and src.dim() == 1):
            raise ValueError(
                "`src`, `dst` and `factor` must be one-dimensional of one length, got shapes"
                f" {tuple(src.shape)}, {tuple(dst.shape)}, {tuple(factor.shape)}"
            )
        self.units, self.rows = units, rows
        self.entries = len(src)
        self.sparse = factor.device.type == "cpu" if sparse is None else sparse
        if self.sparse:
            try:
                self._matrix = self._csr(src, dst, factor)
            except (RuntimeError, NotImplementedError):
                if sparse:
                    raise
                self.sparse = False  # a build without sparse CSR products on this device
        if not self.sparse:
            self._src, self._dst = src.long(), dst.long()
            self._factor = factor[:, None]
            self._taken: dict[int, Tensor] = {}  # per width: the gathered entries (persistent)

    def _csr(self, src: Tensor, dst: Tensor, factor: Tensor) -> Tensor:
        """The ``(units, rows)`` matrix in CSR form, after one trial product."""
        units, rows = self.units, self.rows
        # duplicate (unit, row) pairs are summed; int32 indices: the product reads them every
        # step (25-40 % faster than int64 here)
        coo = torch.sparse_coo_tensor(
            torch.stack([dst.long(), src.long()]), factor, (units, rows), check_invariants=True
        )
        with warnings.catch_warnings():  # torch: "Sparse CSR tensor support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = coo.coalesce().to_sparse_csr()
            crow, col = csr.crow_indices().int(), csr.col_indices().int()
            matrix = torch.sparse_csr_tensor(
                crow, col, csr.values(), (units, rows), check_invariants=True
            )
            out = factor.new_zeros(units, 1)
            torch.addmm(out, matrix, factor.new_zeros(rows, 1), beta=0, out=out)
        return matrix

    def __call__(self, values: Tensor, out: Tensor) -> Tensor:
        """Write ``A @ values`` into ``out`` (``(units, width)``) and return it; ``values`` is
        ``(rows, width)``, float64 like the factors."""
        if self.entries == 0:
            return out.zero_()
        if self.sparse:
            # beta=0: out's old values are ignored (faster than mm(out=) here)
            return torch.addmm(out, self._matrix, values, beta=0, out=out)
        taken = self._taken.get(values.shape[1])
        if taken is None:
            taken = self._taken[values.shape[1]] = values.new_empty(self.entries, values.shape[1])
        torch.index_select(values, 0, self._src, out=taken).mul_(self._factor)
        return out.zero_().index_add_(0, self._dst, taken)
