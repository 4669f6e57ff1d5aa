"""StationarityMonitor: determinism, no effect on training, the iterate, logging, arguments."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.func import functional_call

from tests.helpers.trainer import BalanceModel, fit, make_data, make_loader, make_net
from torch_momentum import stationarity_profile
from torch_momentum.callbacks import StationarityMonitor, training_step_loss

pytestmark = pytest.mark.usefixtures("one_thread")

RADII = (1e-3, 1e-2, 1e-1)
EPOCHS = 3


def _train(
    monitor: StationarityMonitor | None,
    optimizer: str = "polyak",
    shuffle: bool = False,
    logger: object = False,
) -> tuple[BalanceModel, pl.Trainer]:
    """EPOCHS epochs of 4 batches of 16 (``shuffle``: drawn from torch's global RNG)."""
    torch.manual_seed(0)
    model = BalanceModel(make_net(bias=True), lr=0.05, momentum=0.9, optimizer=optimizer)
    x, y = make_data()
    loader = make_loader(x, y, batch_size=16)
    if shuffle:
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=16, shuffle=True)
    callbacks = [monitor] if monitor is not None else []
    trainer = fit(model, callbacks, loader, max_steps=-1, max_epochs=EPOCHS, logger=logger)
    return model, trainer


def _monitor(**kwargs: object) -> StationarityMonitor:
    return StationarityMonitor(radii=RADII, num_samples=12, subset_size=40, **kwargs)  # type: ignore[arg-type]


def test_history_is_deterministic_and_has_the_keys() -> None:
    a, b = _monitor(), _monitor()
    _train(a)
    _train(b)
    assert len(a.history) == EPOCHS
    assert a.history == b.history  # same seed: the same numbers, bit for bit
    keys = {"epoch", "step", "stationarity/grad_norm", "stationarity/num_samples"}
    keys |= {f"stationarity/{kind}/{d:g}" for kind in ("min_norm", "active") for d in RADII}
    assert set(a.history[0]) == keys
    assert [row["epoch"] for row in a.history] == [0.0, 1.0, 2.0]
    assert [row["step"] for row in a.history] == [4.0, 8.0, 12.0]  # 64 points, batches of 16
    assert a.subset_indices is not None and len(a.subset_indices) == 40
    c = _monitor(seed=1)
    _train(c)
    assert c.history != a.history


def test_training_is_bit_identical_with_and_without_the_monitor() -> None:
    plain, _ = _train(None, shuffle=True)
    watched, _ = _train(_monitor(), shuffle=True)  # shuffling reads torch's global RNG
    for p, q in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.initial_seed() == 0


def _manual_profile(model: BalanceModel, point: dict, monitor: StationarityMonitor, epoch: int):
    x, y = make_data()
    idx = monitor.subset_indices
    xs, ys = x[idx], y[idx]

    def f(params):
        return ((functional_call(model.net, params, (xs,)) - ys) ** 2).mean()

    return stationarity_profile(
        f,
        point,
        RADII,
        num_samples=12,
        generator=torch.Generator().manual_seed(monitor.seed + epoch),
    )


@pytest.mark.parametrize("optimizer", ["polyak", "nesterov"])
def test_certificate_is_at_the_iterate(optimizer: str) -> None:
    monitor = _monitor()
    model, trainer = _train(monitor, optimizer=optimizer)
    opt = trainer.optimizers[0]
    # after the last epoch nothing moved: the monitor's last evaluation is at this state
    point = {n.removeprefix("net."): opt.iterate(p) for n, p in model.named_parameters()}
    ref = _manual_profile(model, point, monitor, EPOCHS - 1)
    last = monitor.history[-1]
    # the same loss (training_step's mean square error vs the hand-written one, same operations)
    # at the same points: equal up to float64 rounding
    assert last["stationarity/grad_norm"] == pytest.approx(ref.grad_norm, rel=1e-12)
    for d, e in zip(RADII, ref.eps_hat, strict=True):
        assert last[f"stationarity/min_norm/{d:g}"] == pytest.approx(e, rel=1e-10, abs=1e-14)
    held = {n.removeprefix("net."): p.detach() for n, p in model.named_parameters()}
    at_held = _manual_profile(model, held, monitor, EPOCHS - 1)
    if optimizer == "nesterov":
        # NesterovSGD holds the look-ahead point y_t in training mode: a different point
        assert abs(at_held.grad_norm - ref.grad_norm) > 1e-6 * ref.grad_norm
    else:
        assert at_held.grad_norm == ref.grad_norm


def test_logs_to_the_logger(tmp_path: Path) -> None:
    monitor = _monitor(every_n_epochs=2)
    _train(monitor, logger=CSVLogger(tmp_path, name="run"))
    assert len(monitor.history) == 1  # epochs 0, 1, 2: only after epoch 1
    with (tmp_path / "run" / "version_0" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("stationarity/grad_norm")]
    assert len(logged) == 1 and logged[0]["step"] == "8"  # after 2 epochs of 4 batches
    for key, value in monitor.history[0].items():
        if key.startswith("stationarity/"):
            assert float(logged[0][key]) == pytest.approx(value, rel=1e-15)


def test_profile_leaves_parameters_grads_and_modes_alone() -> None:
    monitor = _monitor()
    model, trainer = _train(monitor)
    model.train()
    model.net[0].eval()  # a mixed state must come back as it was
    before = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state = torch.get_rng_state()
    monitor.profile(trainer, model, epoch=5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert model.training and not model.net[0].training and model.net[1].training
    assert torch.equal(torch.get_rng_state(), state)
    assert "log" not in vars(model)  # training_step_loss restored module.log


def test_custom_loss_fn() -> None:
    def l1(module, batch):
        x, y = batch
        return (module(x) - y).abs().mean()

    monitor = _monitor(loss_fn=l1)
    _train(monitor)
    default = _monitor()
    _train(default)
    assert (
        monitor.history[-1]["stationarity/grad_norm"]
        != default.history[-1]["stationarity/grad_norm"]
    )


def test_training_step_loss_reads_dicts_and_rejects_others() -> None:
    class Bad(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            return 1.0

    with pytest.raises(TypeError, match="loss_fn"):
        training_step_loss(Bad(), None)


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="radii is empty"):
        StationarityMonitor(radii=[])
    with pytest.raises(ValueError, match=r"`every_n_epochs` must be >= 1, got 0"):
        StationarityMonitor(radii=[0.1], every_n_epochs=0)
    with pytest.raises(TypeError, match="`num_samples` must be an int"):
        StationarityMonitor(radii=[0.1], num_samples=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`subset_size` must be >= 1"):
        StationarityMonitor(radii=[0.1], subset_size=-3)
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        StationarityMonitor(radii=[0.1], loss_fn=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`memory` must be one of"):
        StationarityMonitor(radii=[0.1], memory="gpu")
    with pytest.raises(TypeError, match="`dataset` must be indexable"):
        StationarityMonitor(radii=[0.1], dataset=iter([1, 2]))
    with pytest.raises(TypeError, match="`vectorize` must be a bool"):
        StationarityMonitor(radii=[0.1], vectorize=1)  # type: ignore[arg-type]


def test_resume_continues_the_history(tmp_path: Path) -> None:
    """A fit resumed from a checkpoint (ckpt_path=) keeps the evaluations made before it and
    continues the series: equal to the uninterrupted run (same parameters, same seeded subset
    and samples: bit for bit)."""
    full = _monitor()
    _train(full)  # EPOCHS = 3

    first = _monitor()
    torch.manual_seed(0)
    model = BalanceModel(make_net(bias=True), lr=0.05, momentum=0.9, optimizer="polyak")
    loader = make_loader(*make_data(), batch_size=16)
    trainer = fit(model, [first], loader, max_steps=-1, max_epochs=EPOCHS - 1)
    trainer.save_checkpoint(tmp_path / "two.ckpt")

    resumed = _monitor()
    model = BalanceModel(make_net(bias=True), lr=0.05, momentum=0.9, optimizer="polyak")
    ckpt = tmp_path / "two.ckpt"
    fit(model, [resumed], loader, ckpt_path=ckpt, max_steps=-1, max_epochs=EPOCHS)
    assert len(resumed.history) == EPOCHS
    assert resumed.history == full.history


class _ManualModel(BalanceModel):
    def __init__(self) -> None:
        super().__init__(make_net(bias=True), lr=0.05, momentum=0.9, optimizer="polyak")
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        opt = self.optimizers()
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimisation_needs_a_loss_fn() -> None:
    """The default loss is training_step, which under manual optimisation also steps the
    optimiser: refused with a message saying what to pass (it crashed inside autograd before)."""
    loader = make_loader(*make_data(), batch_size=16)
    with pytest.raises(pl.utilities.exceptions.MisconfigurationException, match="`loss_fn=`"):
        fit(_ManualModel(), [_monitor()], loader, max_steps=-1, max_epochs=1)

    def mse(module, batch):
        x, y = batch
        return ((module(x) - y) ** 2).mean()

    monitor = _monitor(loss_fn=mse)
    fit(_ManualModel(), [monitor], loader, max_steps=-1, max_epochs=1)
    assert len(monitor.history) == 1 and monitor.history[0]["stationarity/grad_norm"] > 0
