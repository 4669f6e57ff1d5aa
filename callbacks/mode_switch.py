r"""OptimizerModeSwitch: evaluate at the iterate, train at the look-ahead point.

Some optimisers keep the model's parameters somewhere other than the iterate they converge to:
:class:`~torch_momentum.NesterovSGD` holds the look-ahead point :math:`y_t = x_t + \eta\mu v_t`
in training mode (the gradient is taken there), schedule-free optimisers hold an interpolation.
They expose ``train()`` / ``eval()`` to move the parameters between the two. This callback calls
them at the right moments of a Lightning run.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

__all__ = ["OptimizerModeSwitch", "has_train_eval"]


def has_train_eval(optimizer: Any) -> bool:
    """Whether ``optimizer`` has callable ``train`` and ``eval`` (NesterovSGD, schedule-free).

    Args:
        optimizer: any object (an optimiser, usually).

    Returns:
        ``True`` if both ``optimizer.train`` and ``optimizer.eval`` exist and are callable.

    Example:

        >>> import torch
        >>> from torch_momentum import NesterovSGD
        >>> from torch_momentum.callbacks import has_train_eval
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> has_train_eval(NesterovSGD([p], lr=0.1)), has_train_eval(torch.optim.SGD([p], lr=0.1))
        (True, False)

    """
    return callable(getattr(optimizer, "train", None)) and callable(
        getattr(optimizer, "eval", None)
    )


def _averaging_callback_types() -> tuple[type, ...]:
    """Lightning's callbacks that copy an average into the model in ``on_train_end``."""
    types: list[type] = []
    try:
        from lightning.pytorch.callbacks import WeightAveraging  # EMAWeightAveraging's base

        types.append(WeightAveraging)
    except ImportError:  # Lightning before 2.5
        pass
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    types.append(StochasticWeightAveraging)
    return tuple(types)


def _reported_mode(optimizer: Any) -> bool | None:
    """The optimizer's own record of its mode (``param_groups[i]["train_mode"]``), if any."""
    groups = getattr(optimizer, "param_groups", None) or []
    modes = [g["train_mode"] for g in groups if "train_mode" in g]
    return all(modes) if modes else None


class OptimizerModeSwitch(Callback):
    r"""Run validation, test and prediction at the iterate :math:`x_t`, training at the look-ahead.

    For every optimiser of the Trainer that has ``train()`` and ``eval()``:

    - ``on_train_start``: ``train()`` (also after resuming from a checkpoint saved in eval mode);
    - ``on_validation_start`` / ``on_test_start`` / ``on_predict_start``: ``eval()``, so the
      parameters hold :math:`x_t` and the metrics are those of the iterate;
    - validation during ``fit``: ``train()`` is called at the start of the next training batch,
      not at the end of validation. Lightning runs ``ModelCheckpoint`` last among the
      ``on_validation_end`` hooks, so checkpoints saved after validation hold the weights the
      validation metrics were computed for (:math:`x_t`), with the optimiser state saying
      ``train_mode=False``: a consistent pair that resumes exactly (``on_train_start`` moves back
      to :math:`y_t = x_t + \eta\mu v_t`, the same arithmetic as the uninterrupted run);
    - standalone ``validate`` / ``test`` / ``predict``: the previous mode is restored at the end;
    - ``on_train_end``: ``eval()``, so after ``trainer.fit`` the model holds the iterate
      :math:`x_T` (what one evaluates or exports). The next ``fit`` switches back.

    Checkpoints saved during training outside validation hold :math:`y_t` (training mode), which
    ``fit`` resumes exactly; ``validate``/``test``/``predict`` with ``ckpt_path=`` restore no
    optimiser state and so evaluate them at :math:`y_t`: this callback warns when they load one.

    Optimisers without ``train``/``eval`` are left alone. A checkpoint saved in eval mode must be
    resumed with this callback (or a manual ``optimizer.train()``): ``NesterovSGD.step()`` refuses
    to run in eval mode.

    **Weight averaging** (``EMAWeightAveraging``, ``StochasticWeightAveraging``): these copy their
    average into the model in ``on_train_end``. At ``setup("fit")`` this callback moves itself
    ahead of them in ``trainer.callbacks`` (the relative order of all other callbacks is kept), so
    that whatever order they were passed in, ``eval()`` moves the parameters to :math:`x_T`
    first and the average then replaces them: after ``fit`` the model holds the average and the
    optimiser is in eval mode. The average is taken of what the parameters hold when the
    averaging callback reads them, after each training batch: for NesterovSGD the look-ahead
    points :math:`y_t`, so an EMA of a NesterovSGD run averages look-ahead points, not iterates
    (the two averages differ by :math:`\eta\mu` times the average velocity). During validation
    the optimiser has moved to :math:`x_t` before the averaging callback swaps its average in, and
    is back at :math:`x_t` when it swaps it out.

    Example:

        >>> import torch
        >>> from torch_momentum import NesterovSGD
        >>> from torch_momentum.callbacks import OptimizerModeSwitch
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = NesterovSGD([p], lr=0.5, momentum=0.5)
        >>> p.grad = torch.ones(1)
        >>> opt.step()  # training mode: p holds y_1 = x_1 + lr*momentum*v_1
        >>> p.item(), opt.iterate(p).item()
        (-0.75, -0.5)
        >>> switch = OptimizerModeSwitch()  # lightning.pytorch.Trainer(callbacks=[switch])

    """

    def __init__(self) -> None:
        super().__init__()
        self._pending_train = False
        self._previous: list[tuple[Any, bool]] = []
        self._modes: dict[int, bool] = {}

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _optimizers(trainer: Trainer) -> list[Any]:
        return [opt for opt in trainer.optimizers if has_train_eval(opt)]

    def _is_training(self, optimizer: Any) -> bool:
        mode = _reported_mode(optimizer)
        return self._modes.get(id(optimizer), True) if mode is None else mode

    @torch.no_grad()
    def _set(self, optimizer: Any, train: bool) -> None:
        if train:
            optimizer.train()
        else:
            optimizer.eval()
        self._modes[id(optimizer)] = train

    def _enter_eval(self, trainer: Trainer) -> None:
        self._previous = []
        for opt in self._optimizers(trainer):
            self._previous.append((opt, self._is_training(opt)))
            self._set(opt, False)

    def _leave_eval(self, trainer: Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            # deferred to the next training batch: see the class docstring
            self._pending_train = True
            return
        for opt, was_training in self._previous:
            if was_training:
                self._set(opt, True)
        self._previous = []

    def _train_all(self, trainer: Trainer) -> None:
        for opt in self._optimizers(trainer):
            self._set(opt, True)
        self._pending_train = False
        self._previous = []

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value:
            return
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]  # set by a connector
        averaging = _averaging_callback_types()
        first = next((i for i, c in enumerate(callbacks) if isinstance(c, averaging)), None)
        mine = next((i for i, c in enumerate(callbacks) if c is self), None)
        if first is not None and mine is not None and mine > first:
            # run on_train_end before the averaging callback copies its average in (see the class
            # docstring); a new list: Lightning is iterating over the old one while calling setup
            callbacks.insert(first, callbacks.pop(mine))
            trainer.callbacks = callbacks  # type: ignore[attr-defined]

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Warn when ``validate``/``test``/``predict`` with ``ckpt_path=`` loads weights saved in
        training mode: they are the look-ahead point, and these stages restore no optimiser
        state to move them to the iterate (``fit`` does, and resumes exactly)."""
        if trainer.state.fn == TrainerFn.FITTING:
            return
        lookahead = any(
            state.get("state")
            and any(g.get("train_mode") and g.get("lookahead") for g in state["param_groups"])
            for state in checkpoint.get("optimizer_states") or []
        )
        if lookahead:
            stage = trainer.state.fn.value if trainer.state.fn is not None else "evaluation"
            rank_zero_warn(
                f"`OptimizerModeSwitch`: `{stage}` loads a checkpoint saved with the"
                " optimiser in training mode (not after validation), so its weights are the"
                " look-ahead point y_t, and they are evaluated there, not at the iterate x_t:"
                " this stage restores no optimiser state to move them. Evaluate the model that"
                " `fit` returns, or a checkpoint saved after validation.",
                category=RuntimeWarning,
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_all(trainer)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_train:
            self._train_all(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for opt in self._optimizers(trainer):
            self._set(opt, False)
        self._pending_train = False

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._enter_eval(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._leave_eval(trainer)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._enter_eval(trainer)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._leave_eval(trainer)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._enter_eval(trainer)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._leave_eval(trainer)
