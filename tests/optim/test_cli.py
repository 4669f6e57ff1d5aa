"""PolyakSGD and NesterovSGD as LightningCLI optimizer class paths.

``--optimizer torch_momentum.PolyakSGD --optimizer.lr 0.1`` must build our class with the given
hyper-parameters (jsonargparse reads the constructor signature) and train a model with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("jsonargparse")
L = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from torch_momentum import NesterovSGD, PolyakSGD  # noqa: E402

pytestmark = [
    # Lightning 2.6 still calls jsonargparse APIs that jsonargparse 4.49+ deprecates: not ours.
    pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning"),
    # LightningCLI warns when pytest's own argv is present besides ``args=``; clear argv instead.
    pytest.mark.usefixtures("clean_argv"),
]


@pytest.fixture
def clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-cli"])


class TinyRegression(L.LightningModule):
    """A linear model with square loss; no ``configure_optimizers``: the CLI supplies it."""

    def __init__(self, in_features: int = 4) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, 1)
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self) -> None:
        self.initial = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)


class TinyData(L.LightningDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, generator=gen)
        y = x.sum(-1, keepdim=True) + 1.0
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


def trainer_defaults(root: Path) -> dict:
    return {
        "default_root_dir": str(root),
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }


def weights_changed(model: TinyRegression) -> bool:
    assert model.initial, "training did not start"
    return any(not torch.equal(model.initial[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("cls", "args", "expected"),
    [
        (PolyakSGD, ["--optimizer.lr", "0.1"], {"lr": 0.1, "momentum": 0.9}),
        (
            NesterovSGD,
            ["--optimizer.lr", "0.05", "--optimizer.momentum", "0.9"],
            {"lr": 0.05, "momentum": 0.9},
        ),
        (
            PolyakSGD,
            ["--optimizer.lr=0.02", "--optimizer.momentum=0.5", "--optimizer.weight_decay=0.01"],
            {"lr": 0.02, "momentum": 0.5, "weight_decay": 0.01},
        ),
    ],
)
def test_optimizer_class_path_run_false(
    tmp_path: Path, cls: type[torch.optim.Optimizer], args: list[str], expected: dict
) -> None:
    cli = LightningCLI(
        TinyRegression,
        TinyData,
        args=["--optimizer", f"torch_momentum.{cls.__name__}", *args, "--trainer.max_steps", "3"],
        run=False,
        trainer_defaults=trainer_defaults(tmp_path),
        save_config_callback=None,
        seed_everything_default=0,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    (opt,) = cli.trainer.optimizers
    assert type(opt) is cls
    for key, value in expected.items():
        assert opt.param_groups[0][key] == pytest.approx(value), key
    assert cli.trainer.global_step == 3
    assert weights_changed(cli.model)
    assert all("velocity" in opt.state[p] for p in cli.model.parameters())


def test_fit_subcommand_with_config_file(tmp_path: Path) -> None:
    """The ``fit`` subcommand, with the optimizer given in a YAML config instead of flags."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "optimizer:\n"
        "  class_path: torch_momentum.NesterovSGD\n"
        "  init_args:\n"
        "    lr: 0.05\n"
        "    momentum: 0.7\n"
        "trainer:\n"
        "  fast_dev_run: 2\n"
    )
    cli = LightningCLI(
        TinyRegression,
        TinyData,
        args=["fit", "--config", str(config)],
        trainer_defaults=trainer_defaults(tmp_path),
        save_config_callback=None,
        seed_everything_default=0,
    )
    (opt,) = cli.trainer.optimizers
    assert type(opt) is NesterovSGD
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.7)
    assert cli.trainer.global_step == 2
    assert weights_changed(cli.model)


@pytest.mark.slow
def test_torch_compile_after_the_cli_in_one_process() -> None:
    """The suite's warnings-as-errors configuration holds whatever the order of the tests: once
    LightningCLI has imported jsonargparse, inductor's cache key pickles objects that touch
    jsonargparse's deprecated import paths, and a later ``torch.compile`` in the same process
    warned, an error under pytest's configuration (the two tests passed alone and failed in this
    order; the suite's order hid it). Runs the pair in a fresh pytest process, in that order."""
    from tests.helpers.processes import run_python

    proc = run_python(
        [
            "-m",
            "pytest",
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            "tests/optim/test_cli.py::test_fit_subcommand_with_config_file",
            "tests/optim/test_optim.py::test_torch_compile_step_matches_eager",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
