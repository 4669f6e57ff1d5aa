"""OptimizerModeSwitch: evaluation at the iterate x_t, training at the look-ahead y_t."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from tests.helpers.trainer import ValidatedModel, fit, make_data, make_loader, make_net
from torch_momentum import NesterovSGD
from torch_momentum.callbacks import OptimizerModeSwitch, has_train_eval

LR, MOMENTUM, STEPS, EVERY = 0.05, 0.9, 6, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(steps: int = STEPS) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Nesterov in velocity form, plain torch: the iterates x_t (t = 0..steps) and the look-ahead
    points y_t = x_t + lr*momentum*v_t (t = 0..steps-1) where the gradients are taken."""
    torch.manual_seed(0)
    net = make_net()
    x, y = make_data()
    params = list(net.parameters())
    xs = [[p.detach().clone() for p in params]]
    vs = [torch.zeros_like(p) for p in params]
    ys = []
    for _ in range(steps):
        with torch.no_grad():
            for p, xt, v in zip(params, xs[-1], vs, strict=True):
                p.copy_(xt + LR * MOMENTUM * v)  # the look-ahead point y_t
        ys.append([p.detach().clone() for p in params])
        net.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        vs = [-p.grad + MOMENTUM * v for p, v in zip(params, vs, strict=True)]
        xs.append([xt + LR * v for xt, v in zip(xs[-1], vs, strict=True)])
    return xs, ys


def _train(
    tmp_path: Path,
    callbacks: list[Any],
    max_steps: int = STEPS,
    ckpt_path: Any = None,
    val_every: int = EVERY,
) -> tuple[ValidatedModel, pl.Trainer]:
    """NesterovSGD on the full batch, validated every ``val_every`` steps."""
    torch.manual_seed(0)
    model = ValidatedModel(make_net(), lr=LR, momentum=MOMENTUM, optimizer="nesterov")
    x, y = make_data()
    trainer = fit(
        model,
        callbacks,
        make_loader(x, y, repeat=STEPS),
        val_loader=make_loader(x, y),
        ckpt_path=ckpt_path,
        max_steps=max_steps,
        limit_val_batches=None,
        val_check_interval=val_every,
        default_root_dir=tmp_path,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    return model, trainer


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    # float64; the optimiser and the reference do the same operations in a different order and
    # eval()/train() shift by lr*momentum*v and back: a few ulps of O(1) numbers. A wrong point
    # (y_t for x_t) is off by lr*momentum*|v| ~ 1e-3, far above 1e-12.
    return all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(a, b, strict=True))


def test_validation_runs_at_the_iterate(tmp_path: Path) -> None:
    xs, ys = _reference()
    model, trainer = _train(tmp_path, [OptimizerModeSwitch()])
    assert [r["step"] for r in model.val_records] == [2, 4, 6]
    x, y = make_data()
    net = make_net()
    for record in model.val_records:
        t = record["step"]
        assert _close(record["params"], xs[t])  # validation saw x_t ...
        assert not _close(record["params"], ys[t - 1])  # ... which differs from a look-ahead
        with torch.no_grad():
            for p, value in zip(net.parameters(), xs[t], strict=True):
                p.copy_(value)
            expected = ((net(x) - y) ** 2).mean().item()
        # the same float64 forward pass on the same weights (up to the 1e-12 weight difference)
        assert record["loss"] == pytest.approx(expected, rel=1e-10)
    # after fit the model holds the final iterate and the optimiser is in eval mode
    assert _close(list(model.parameters()), xs[STEPS])
    assert trainer.optimizers[0].training is False

    # control: without the callback validation sees the look-ahead point y_t
    plain, _ = _train(tmp_path / "plain", [])
    first = plain.val_records[0]
    assert not _close(first["params"], xs[first["step"]])


def test_checkpoint_saved_after_validation_resumes_exactly(tmp_path: Path) -> None:
    xs, _ = _reference()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1)
    whole, _ = _train(tmp_path, [OptimizerModeSwitch(), checkpoints])
    path = tmp_path / "ckpt" / "step=4.ckpt"
    ckpt = torch.load(path, weights_only=False)
    # ModelCheckpoint runs after validation: the weights are the validated iterate x_4 and the
    # optimiser state says so, a consistent pair
    assert _close(list(ckpt["state_dict"].values()), xs[4])
    assert all(g["train_mode"] is False for g in ckpt["optimizer_states"][0]["param_groups"])

    resumed, _ = _train(tmp_path / "resumed", [OptimizerModeSwitch()], ckpt_path=path)
    assert [r["step"] for r in resumed.val_records] == [6]
    # resuming moves back to y_4 = x_4 + lr*momentum*v_4 with the same arithmetic as the
    # uninterrupted run, which also went x_4 -> y_4 after validating: identical floats
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)
    assert _close(list(resumed.parameters()), xs[STEPS])


class _Shift(torch.optim.SGD):
    """Duck-typed optimiser with train()/eval() but no ``train_mode`` record: logs the calls."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=0.1)
        self.calls: list[str] = []

    def train(self) -> None:
        self.calls.append("train")

    def eval(self) -> None:
        self.calls.append("eval")


def _trainer(fn: TrainerFn, optimizers: list[Any]) -> Any:
    return SimpleNamespace(state=SimpleNamespace(fn=fn), optimizers=optimizers)


def test_hook_sequence_fit_and_standalone() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    shift, nesterov, sgd = _Shift([p]), NesterovSGD([p], lr=0.1), torch.optim.SGD([p], lr=0.1)
    assert has_train_eval(shift) and has_train_eval(nesterov) and not has_train_eval(sgd)
    switch = OptimizerModeSwitch()

    fitting = _trainer(TrainerFn.FITTING, [shift, nesterov, sgd])
    switch.on_validation_start(fitting, None)  # sanity check before training
    switch.on_validation_end(fitting, None)
    switch.on_train_start(fitting, None)
    switch.on_train_batch_start(fitting, None, None, 0)
    switch.on_validation_start(fitting, None)
    switch.on_validation_end(fitting, None)
    assert nesterov.training is False  # still at x_t while ModelCheckpoint saves
    switch.on_train_batch_start(fitting, None, None, 1)
    assert nesterov.training is True
    switch.on_train_end(fitting, None)
    assert shift.calls == ["eval", "train", "eval", "train", "eval"]
    assert nesterov.training is False

    # standalone validate/test/predict restore the previous mode: eval stays eval ...
    testing = _trainer(TrainerFn.TESTING, [shift, nesterov])
    switch.on_test_start(testing, None)
    switch.on_test_end(testing, None)
    assert shift.calls[-2:] == ["eval", "eval"] and nesterov.training is False
    # ... and train returns to train, for optimisers with and without a train_mode record
    nesterov.train()
    fresh = _Shift([p])
    predicting = _trainer(TrainerFn.PREDICTING, [fresh, nesterov])
    switch.on_predict_start(predicting, None)
    assert nesterov.training is False
    switch.on_predict_end(predicting, None)
    assert fresh.calls == ["eval", "train"] and nesterov.training is True


# BalanceModel overrides configure_model (for FSDP2 in the DDP script; a no-op here), and Lightning
# warns that WeightAveraging cannot shard such a model: nothing is sharded in this test.
@pytest.mark.filterwarnings("ignore:You're using the WeightAveraging callback with a model")
@pytest.mark.parametrize("switch_first", [True, False], ids=["switch-then-ema", "ema-then-switch"])
def test_ema_weight_averaging_in_either_order(tmp_path: Path, switch_first: bool) -> None:
    # EMAWeightAveraging copies its average into the model in on_train_end; OptimizerModeSwitch's
    # on_train_end calls eval(), which subtracts lr*momentum*v. Before the fix, with the EMA
    # listed first, eval() ran after the copy and the final weights were average - lr*m*v.
    decay = 0.5
    _, ys = _reference(steps=STEPS + 1)
    # after optimiser step t the parameters hold y_t: the EMA averages the look-ahead points
    # y_1..y_STEPS (AveragedModel: first update copies, then avg <- decay*avg + (1-decay)*p)
    expected: list[list[torch.Tensor]] = [ys[1]]
    for t in range(2, STEPS + 1):
        expected.append(
            [decay * a + (1 - decay) * y for a, y in zip(expected[-1], ys[t], strict=True)]
        )
    switch, ema = OptimizerModeSwitch(), EMAWeightAveraging(decay=decay)
    # validation at step 4 only: a validation at the last step would leave the optimiser in eval
    # mode already (train() is deferred to the next batch) and hide the end-of-fit shift
    callbacks = [switch, ema] if switch_first else [ema, switch]
    model, trainer = _train(tmp_path, callbacks, val_every=4)
    assert _close(list(model.parameters()), expected[STEPS - 1])  # the average, unshifted
    assert trainer.optimizers[0].training is False
    # validation saw the average of the look-ahead points so far ...
    assert [r["step"] for r in model.val_records] == [4]
    for record in model.val_records:
        assert _close(record["params"], expected[record["step"] - 1])
    # ... and training went on from the right points: validation's swaps left the trajectory
    # alone, so the optimiser's last velocity is the reference's (x_T - x_{T-1}) / lr
    xs, _ = _reference()
    opt = trainer.optimizers[0]
    for p, x_now, x_prev in zip(model.parameters(), xs[STEPS], xs[STEPS - 1], strict=True):
        assert torch.allclose(LR * opt.state[p]["velocity"], x_now - x_prev, rtol=0, atol=1e-12)


class _SaveDuringTraining(pl.Callback):
    """Saves a checkpoint after training batch ``at`` (optimiser in training mode: y_t)."""

    def __init__(self, path: Path, at: int) -> None:
        self.path, self.at = path, at

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            trainer.save_checkpoint(self.path)


def test_test_from_a_checkpoint_saved_in_training_mode_warns(tmp_path: Path) -> None:
    """trainer.validate/test(ckpt_path=...) restore weights only: from a checkpoint saved in
    training mode they evaluate the look-ahead point y_t. That is said with a warning, never
    silently; a checkpoint saved after fit (eval mode: x_T) loads without one."""
    import warnings

    xs, ys = _reference()
    during, after = tmp_path / "during.ckpt", tmp_path / "after.ckpt"
    model, trainer = _train(tmp_path, [OptimizerModeSwitch(), _SaveDuringTraining(during, 3)])
    trainer.save_checkpoint(after)  # after fit: eval mode, the weights are x_T
    ckpt = torch.load(during, weights_only=False)
    assert all(g["train_mode"] is True for g in ckpt["optimizer_states"][0]["param_groups"])
    assert _close(list(ckpt["state_dict"].values()), ys[3])  # y_3 = x_3 + lr*momentum*v_3
    x, y = make_data()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*OptimizerModeSwitch.*")
        trainer.validate(model, make_loader(x, y), ckpt_path=after)
    assert _close(model.val_records[-1]["params"], xs[STEPS])
    with pytest.warns(RuntimeWarning, match="look-ahead point y_t, and they are evaluated there"):
        trainer.validate(model, make_loader(x, y), ckpt_path=during)
    assert _close(model.val_records[-1]["params"], ys[3])  # what the warning says
