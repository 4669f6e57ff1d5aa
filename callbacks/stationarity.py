r"""StationarityMonitor: (δ, ε)-Goldstein stationarity certificates of the training loss.

At the end of every ``n``-th training epoch the callback computes
:func:`~torch_momentum.stationarity_profile` of the training loss over a fixed, seeded subset of
the training data, at the current iterate, and logs it. The arithmetic lives in
:mod:`torch_momentum.stationarity`; this module only gathers the data, builds the loss as a
function of the parameters, sizes the certificate, shows its progress and logs.
"""

from __future__ import annotations

import numbers
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data._utils.collate import default_collate
from tqdm.auto import tqdm
from typing_extensions import override

from torch_momentum._sampling import MEMORY_MODES, check_radii
from torch_momentum.callbacks._trainer import logging_step, metric_states_kept
from torch_momentum.stationarity import StationarityProfile, stationarity_profile

__all__ = ["StationarityMonitor", "certificate_sizes", "training_step_loss"]

LossFn = Callable[[LightningModule, Any], Tensor]


def training_step_loss(module: LightningModule, batch: Any) -> Tensor:
    """The loss of ``module.training_step(batch, 0)`` (the tensor, or its ``"loss"`` entry).

    ``module.log`` and ``module.log_dict`` are silenced during the call, so that metrics logged
    inside ``training_step`` are not logged again (and never see vmapped tensors), and the
    torchmetrics ``Metric`` states inside the module are restored after it, so that metrics
    updated there do not count the call as a training batch.

    Args:
        module: the LightningModule.
        batch: a batch as the training dataloader yields it (already on the module's device).

    Returns:
        The scalar loss tensor.

    Raises:
        TypeError: ``training_step`` returned neither a tensor nor a mapping with ``"loss"``.

    Example:

        >>> import torch
        >>> import lightning.pytorch as pl
        >>> from torch_momentum.callbacks import training_step_loss
        >>> class Model(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.tensor([2.0]))
        ...     def training_step(self, batch, batch_idx):
        ...         loss = ((self.w * batch[0] - batch[1]) ** 2).mean()
        ...         self.log("train_loss", loss)
        ...         return {"loss": loss}
        >>> batch = (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
        >>> training_step_loss(Model(), batch).item()
        5.0

    """
    had = {name: name in vars(module) for name in ("log", "log_dict")}
    for name in had:  # instance attributes that shadow the methods for this call
        setattr(module, name, _no_log)
    try:
        with metric_states_kept(module):  # the call is no training batch for its metrics
            out = module.training_step(batch, 0)
    finally:
        for name, present in had.items():
            if not present:
                delattr(module, name)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise TypeError(
            "StationarityMonitor: `training_step` must return the loss tensor or a dict with"
            f" 'loss' for the default loss_fn, got {type(out).__name__}; pass"
            " `loss_fn=lambda module, batch: ...`"
        )
    return out


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


class _LossOfParameters(nn.Module):
    """``loss_fn(module, batch)`` as a module whose parameters ``functional_call`` replaces."""

    def __init__(self, module: LightningModule, loss_fn: LossFn) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.module, batch)


# Sizing of a certificate when num_samples / subset_size are not given: its cost,
# len(radii) * k gradients of the loss over m examples, is at most one epoch of the training data
# (n example-gradients), with k in [_MIN_SAMPLES, _MAX_SAMPLES] and m <= _MAX_SUBSET (the subset
# shrinks below that when even _MIN_SAMPLES gradients over it would cost more than an epoch).
_MIN_SAMPLES = 8
_MAX_SAMPLES = 64
_MAX_SUBSET = 1024
# Samples per block: the progress bar, a stop request (SIGTERM) and max_seconds act between blocks.
_CHUNK = 8


def certificate_sizes(
    n: int, num_radii: int, num_samples: int | None, subset_size: int | None
) -> tuple[int, int]:
    """``(k, m)``: samples per radius and examples in the subset for a dataset of ``n`` examples.

    Given values are kept; missing ones are chosen so that ``num_radii * k * m <= n`` (one epoch
    of example-gradients) where the bounds allow: ``k = min(64, n // (num_radii * m))`` with
    ``m = min(1024, n)``, and when that is below 8, ``k = 8`` with the largest ``m`` that fits.

    Example:
        >>> from torch_momentum.callbacks.stationarity import certificate_sizes
        >>> certificate_sizes(50_000, 2, None, None), certificate_sizes(160, 2, None, None)
        ((24, 1024), (8, 10))
    """
    if subset_size is not None:
        m = min(subset_size, n)
        k = num_samples or min(_MAX_SAMPLES, max(_MIN_SAMPLES, n // (num_radii * m)))
        return k, m
    if num_samples is not None:
        return num_samples, max(1, min(_MAX_SUBSET, n, n // (num_radii * num_samples)))
    m = min(_MAX_SUBSET, n)
    k = min(_MAX_SAMPLES, n // (num_radii * m))
    if k >= _MIN_SAMPLES:
        return k, m
    return _MIN_SAMPLES, max(1, n // (num_radii * _MIN_SAMPLES))


class _Progress:
    """``progress(done, total)`` for :func:`stationarity_profile`: a bar on rank zero (when the
    trainer shows one), SIGTERM (Lightning's handler only sets a flag, which the training loop
    reads between batches: a certificate must read it too, else the process runs on for its
    whole duration) and the ``max_seconds`` budget. Under DDP the ranks agree on both flags."""

    def __init__(self, trainer: Trainer, epoch: int, max_seconds: float | None, radii: int):
        self.trainer = trainer
        self.share = None if max_seconds is None else max_seconds / radii
        self.start = time.perf_counter()
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        self.bar = (
            tqdm(desc=f"Stationarity certificate (epoch {epoch})", unit="grad", leave=False)
            if show
            else None
        )

    def __call__(self, done: int, total: int) -> bool:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)
        over = self.share is not None and time.perf_counter() - self.start > self.share
        sigterm = bool(self.trainer.received_sigterm)
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            device = self.trainer.strategy.root_device
            flags = torch.tensor([float(sigterm), float(over)], device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            sigterm, over = bool(flags[0] > 0), bool(flags[1] > 0)
        if sigterm:
            raise SIGTERMException()
        return over

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StationarityMonitor(Callback):
    r"""Log the (δ, ε)-Goldstein stationarity profile of the training loss every ``n`` epochs.

    At the end of every ``every_n_epochs``-th training epoch, with :math:`f` the mean training
    loss over a fixed subset :math:`D` of the training data (``subset_size`` examples chosen once
    with ``seed``) and :math:`x_t` the current iterate, the callback computes for every radius
    :math:`\delta` the minimum norm :math:`\hat\varepsilon(\delta)` of the convex hull of
    ``num_samples`` gradients of :math:`f` sampled uniformly in :math:`B(x_t, \delta)`, and logs
    (to every logger, from rank zero, at the current step):

    ====================================== =====================================================
    ``stationarity/min_norm/{delta:g}``    :math:`\hat\varepsilon(\delta)`: :math:`x_t` is
                                           :math:`(\delta, \hat\varepsilon)`-Goldstein stationary
    ``stationarity/active/{delta:g}``      samples with positive weight in the min-norm element
    ``stationarity/grad_norm``             :math:`\|\nabla f(x_t)\|` by autograd at :math:`x_t`
    ``stationarity/num_samples``           the samples per radius this certificate drew
    ====================================== =====================================================

    ``history`` keeps one dict ``{"epoch": e, "step": s, key: value}`` per evaluation (on every
    rank: under DDP every rank computes the same certificate); it is part of the callback's
    checkpoint state, so a fit resumed with ``ckpt_path=`` continues it. Under manual
    optimisation pass ``loss_fn`` (the default loss is ``training_step``, which would step the
    optimiser). The certificate is one-sided:
    a small :math:`\hat\varepsilon` proves stationarity of the stated loss at scale
    :math:`\delta`; a large one proves nothing.

    - **Cost.** One certificate takes ``len(radii) * num_samples`` gradients of the loss over
      ``subset_size`` examples (plus one at :math:`x_t`). Left at ``None``, the two are sized
      from the training data so that this is at most one epoch of example-gradients
      (:func:`certificate_sizes`: e.g. 24 samples over 1024 examples for 50,000 examples and two
      radii; for tiny datasets 8 samples over a smaller subset); the choice is deterministic.
      ``max_seconds`` adds a time budget: the sampling stops at the first block of 8 past
      ``max_seconds / len(radii)`` seconds of the first radius, and every radius uses as many
      samples (the certificate holds with fewer samples; it is weaker, and no longer
      reproducible, since it depends on timing). A progress bar shows while it runs (on rank
      zero, when the trainer shows one), and SIGTERM stops it at the next block (Lightning then
      shuts down as it does between batches).
    - **Gradients.** Batched with ``torch.func.vmap`` unless the first block shows that a loop
      of ``torch.autograd.grad`` calls is faster or that vmap falls back to one sample at a time
      (torch has no batching rule for the LSTM kernel, for instance); one warning says so and
      the later certificates use the loop directly.
    - The loss is ``loss_fn(module, batch)`` with the parameters replaced through
      ``torch.func.functional_call``; default :func:`training_step_loss` (the module's own
      ``training_step``, logging silenced). It must be the MEAN over the batch. The module is put
      in eval mode during the evaluation (dropout off, BatchNorm running statistics read, not
      updated), so that :math:`f` is a deterministic function; training flags are restored.
    - The point is the iterate: for optimisers with ``iterate(p)`` (NesterovSGD keeps the
      look-ahead point in training mode) the parameters are replaced by ``opt.iterate(p)``.
    - Nothing of training changes: parameters, gradients, optimiser state and torch's global RNG
      state (CPU and CUDA) are left as they were; the sample points come from a private
      generator seeded with ``seed + epoch``.
    - Data: ``dataset`` or the training dataloader's dataset (indexable, with ``len``; an
      ``IterableDataset`` is refused when training starts, before the first batch), batched
      with the dataloader's ``collate_fn``. Under DDP the subset is split across ranks, each
      rank's gradients are weighted by its share and summed across ranks, so :math:`f` is the
      same mean over the same subset as in a single process.

    Args:
        radii: the radii :math:`\delta > 0` (a sequence, a tensor or a numpy array).
        num_samples: ``k`` per radius (default ``None``: sized, see Cost).
        every_n_epochs: evaluate after every ``n``-th training epoch (default 1).
        subset_size: examples in the fixed subset (default ``None``: sized, see Cost; the whole
            dataset if smaller).
        seed: seed of the subset and of the sample points (default 0).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor`` (default :func:`training_step_loss`).
        dataset: the data to draw the subset from (default: the training dataloader's dataset).
        memory: ``"device"``, ``"host"`` or ``"recompute"`` (see
            :func:`~torch_momentum.stationarity_profile`; default ``"device"``).
        chunk_size: samples per block (default 8: the progress bar, SIGTERM and ``max_seconds``
            act between blocks).
        vectorize: batch gradients with ``torch.func.vmap`` where that pays (default ``True``).
        max_seconds: time budget of one certificate in seconds (default ``None``: none).

    Raises:
        TypeError / ValueError: an argument of the wrong type or value (naming it).

    Example:

        >>> from torch_momentum.callbacks import StationarityMonitor
        >>> monitor = StationarityMonitor(radii=[1e-3, 1e-2], num_samples=16, subset_size=256)
        >>> monitor.radii, monitor.history
        ((0.001, 0.01), [])

    """

    def __init__(
        self,
        radii: Sequence[float],
        num_samples: int | None = None,
        every_n_epochs: int = 1,
        subset_size: int | None = None,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        dataset: Any = None,
        memory: str = "device",
        chunk_size: int | None = None,
        vectorize: bool = True,
        max_seconds: float | None = None,
    ) -> None:
        super().__init__()
        self.radii: tuple[float, ...] = check_radii(radii)
        self.num_samples: int | None = _optional_positive_int("num_samples", num_samples)
        self.every_n_epochs: int = _positive_int("every_n_epochs", every_n_epochs)
        self.subset_size: int | None = _optional_positive_int("subset_size", subset_size)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"`seed` must be an int, got {seed!r}")
        self.seed: int = operator.index(seed)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable or None, got {loss_fn!r}")
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else training_step_loss
        if dataset is not None and not _map_style(dataset):
            raise TypeError(
                f"`dataset` must be indexable with a length (a map-style Dataset), got {dataset!r}"
            )
        self.dataset: Any = dataset
        if not isinstance(memory, str) or memory not in MEMORY_MODES:
            raise ValueError(f"`memory` must be one of {MEMORY_MODES}, got {memory!r}")
        self.memory: str = memory
        self.chunk_size: int = _optional_positive_int("chunk_size", chunk_size) or _CHUNK
        if not isinstance(vectorize, bool):
            raise TypeError(f"`vectorize` must be a bool, got {vectorize!r}")
        self.vectorize: bool = vectorize
        self.max_seconds: float | None = _optional_seconds(max_seconds)

        #: one dict per evaluation: ``{"epoch": e, "step": s, key: value, ...}``
        self.history: list[dict[str, float]] = []
        #: the indices of the subset in the dataset (chosen at the first evaluation)
        self.subset_indices: list[int] | None = None
        self._data: tuple[Any, Callable[[list[Any]], Any]] | None = None
        self._sizes: tuple[int, int] | None = None
        self._batch: Any = None
        self._share: float = 1.0
        self._warned_no_iterate: bool = False

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(radii=list(self.radii), seed=self.seed)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The history: a resumed fit continues the same series (the subset is drawn again from
        ``seed``, the same examples for the same dataset)."""
        return {"history": [dict(row) for row in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization and self.loss_fn is training_step_loss:
            raise MisconfigurationException(
                "`StationarityMonitor` with manual optimisation needs `loss_fn=`: the default"
                " loss is the module's training_step, which here also steps the optimiser."
                " Pass `loss_fn=lambda module, batch: ...` returning the scalar loss."
            )
        strategy = type(trainer.strategy).__name__
        if strategy in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"):
            raise MisconfigurationException(
                f"`StationarityMonitor` does not support `{strategy}`: it needs the full"
                " parameters on every rank. Use a single device or `strategy='ddp'`."
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The first hook with the training dataloader loaded (setup runs before the module's own
        # setup, which often builds the data): an IterableDataset is refused here, before the
        # first batch, not after the first epoch.
        self._resolve_data(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs != 0:
            return
        profile = self.profile(trainer, pl_module, epoch)
        metrics: dict[str, float] = {"stationarity/grad_norm": profile.grad_norm}
        for delta, eps, active in zip(profile.radii, profile.eps_hat, profile.active, strict=True):
            metrics[f"stationarity/min_norm/{delta:g}"] = eps
            metrics[f"stationarity/active/{delta:g}"] = float(active)
        metrics["stationarity/num_samples"] = float(profile.num_samples)
        step = logging_step(trainer)
        self.history.append({"epoch": float(epoch), "step": float(step), **metrics})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------------------------------
    # the certificate
    # ------------------------------------------------------------------------------------------

    def profile(
        self, trainer: Trainer, pl_module: LightningModule, epoch: int = 0
    ) -> StationarityProfile:
        """The profile at the current iterate (what the hook logs); every rank must call it."""
        batch = self._subset_batch(trainer, pl_module)
        names, point = self._iterate(trainer, pl_module)
        wrapper = _LossOfParameters(pl_module, self.loss_fn)

        def f(params: Tensor | dict[str, Tensor]) -> Tensor:
            assert isinstance(params, dict)  # x is a dict: so are the points
            inner = {f"module.{n}": params[n] for n in names}
            return functional_call(wrapper, inner, (batch,), strict=False)

        generator = torch.Generator().manual_seed(self.seed + epoch)
        modes = {m: m.training for m in pl_module.modules()}
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        assert self._sizes is not None  # set with the subset
        progress = _Progress(trainer, epoch, self.max_seconds, len(self.radii))
        try:
            pl_module.eval()
            with torch.random.fork_rng(devices=devices):
                result = stationarity_profile(
                    f,
                    point,
                    self.radii,
                    num_samples=self._sizes[0],
                    generator=generator,
                    vectorize=self.vectorize,
                    memory=self.memory,
                    chunk_size=self.chunk_size,
                    reduce_grads=self._reduce(trainer),
                    progress=progress,
                )
        finally:
            progress.close()
            for m, mode in modes.items():
                m.training = mode
        self.vectorize = result.vectorized  # the first block chose the loop: keep it (no re-check)
        return result

    def _reduce(self, trainer: Trainer) -> Callable[[Tensor], Tensor] | None:
        """Under DDP: each rank's gradients weighted by its share of the subset, summed."""
        if not (trainer.world_size > 1 and dist.is_available() and dist.is_initialized()):
            return None
        share = self._share

        def reduce(g: Tensor) -> Tensor:
            g = g * share
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            return g

        return reduce

    def _iterate(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> tuple[list[str], dict[str, Tensor]]:
        """The trainable parameters at the iterate (``opt.iterate(p)`` where available)."""
        owner: dict[int, Any] = {}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    owner[id(p)] = optimizer
        point: dict[str, Tensor] = {}
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            opt = owner.get(id(p))
            iterate = getattr(opt, "iterate", None)
            if callable(iterate):
                point[name] = iterate(p)
            else:
                if opt is not None and callable(getattr(opt, "eval", None)):
                    if not self._warned_no_iterate:
                        rank_zero_warn(
                            f"`StationarityMonitor`: {type(opt).__name__} has train()/eval() but"
                            " no iterate(p); the certificate is computed at the parameters as"
                            " the model holds them.",
                            category=RuntimeWarning,
                        )
                        self._warned_no_iterate = True
                point[name] = p.detach().clone()
        if not point:
            raise MisconfigurationException(
                "`StationarityMonitor`: the module has no trainable parameters"
            )
        return list(point), point

    def _resolve_data(self, trainer: Trainer) -> tuple[Any, Callable[[list[Any]], Any]]:
        """The dataset to draw the subset from and the collate function; the sizes."""
        if self._data is not None:
            return self._data
        dataset, collate = self.dataset, default_collate
        loader = trainer.train_dataloader
        if isinstance(loader, DataLoader):
            collate = loader.collate_fn or default_collate
            if dataset is None:
                dataset = loader.dataset
        if dataset is None or not _map_style(dataset):
            kind = "no dataset" if dataset is None else f"a {type(dataset).__name__}"
            raise MisconfigurationException(
                "`StationarityMonitor` needs a map-style training dataset (indexable, with a"
                f" length) to draw its fixed subset from, and the training data is {kind}"
                " (an IterableDataset cannot be indexed); pass `dataset=` explicitly (a"
                " map-style dataset with examples of the training distribution)."
            )
        self._sizes = certificate_sizes(
            len(dataset), len(self.radii), self.num_samples, self.subset_size
        )
        self._data = (dataset, collate)
        return self._data

    def _subset_batch(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        if self._batch is not None:
            return self._batch
        dataset, collate = self._resolve_data(trainer)
        assert self._sizes is not None  # set with the data
        n, size = len(dataset), self._sizes[1]
        g = torch.Generator().manual_seed(self.seed)
        self.subset_indices = sorted(torch.randperm(n, generator=g)[:size].tolist())
        world, rank = trainer.world_size, trainer.global_rank
        mine = self.subset_indices[rank::world]
        if not mine:
            raise MisconfigurationException(
                f"`StationarityMonitor`: subset_size={size} is smaller than the {world} ranks"
            )
        self._share = len(mine) / size
        batch = collate([dataset[i] for i in mine])
        self._batch = move_data_to_device(batch, pl_module.device)
        return self._batch


def _map_style(dataset: object) -> bool:
    return (
        not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__len__")
        and hasattr(dataset, "__getitem__")
    )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    value = operator.index(value)
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}")
    return value


def _optional_positive_int(name: str, value: object) -> int | None:
    return None if value is None else _positive_int(name, value)


def _optional_seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`max_seconds` must be a number or None, got {value!r}")
    if not float(value) > 0:  # NaN too
        raise ValueError(f"`max_seconds` must be > 0, got {value!r}")
    return float(value)
