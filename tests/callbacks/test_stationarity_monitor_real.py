"""StationarityMonitor on the models people train: an MLP, a small CNN with BatchNorm and a
one-layer LSTM language model over 160 sequences, with the default (data-sized) certificate;
the progress bar, SIGTERM during a certificate, the time budget and IterableDatasets."""

from __future__ import annotations

import os
import signal
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from tests.helpers.trainer import fit
from torch_momentum import PolyakSGD
from torch_momentum.callbacks import StationarityMonitor
from torch_momentum.callbacks.stationarity import certificate_sizes

pytestmark = pytest.mark.usefixtures("one_thread")

RADII = (1e-3, 1e-2)
VOCAB, SEQ = 50, 12


class Task(pl.LightningModule):
    """A network, its loss and a fixed dataset (reference models of the certificate cost)."""

    def __init__(self, net: nn.Module, loss: str, data: TensorDataset, batch_size: int = 32):
        super().__init__()
        self.net, self.loss, self.data, self.batch_size = net, loss, data, batch_size
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        out = self(x)
        if self.loss == "mse":
            return ((out - y) ** 2).mean()
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def configure_optimizers(self):
        return PolyakSGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


class LSTMLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.out = nn.Linear(32, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.emb(tokens))[0])


def mlp_task() -> Task:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = torch.tanh(x @ torch.randn(10, 1))
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    return Task(net, "mse", TensorDataset(x, y))


def cnn_task() -> Task:
    torch.manual_seed(0)
    x = torch.randn(128, 1, 8, 8)
    y = torch.randint(0, 10, (128,))
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    return Task(net, "ce", TensorDataset(x, y))


def lstm_task() -> Task:
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (160, SEQ + 1))
    return Task(LSTMLanguageModel(), "ce", TensorDataset(tokens[:, :-1], tokens[:, 1:]))


def fit_task(task: Task, monitor: StationarityMonitor, epochs: int = 1, **kwargs) -> pl.Trainer:
    """``epochs`` epochs of ``task`` on its own data with ``monitor``."""
    loader = task.train_dataloader()
    return fit(task, [monitor], loader, max_epochs=epochs, max_steps=-1, **kwargs)


@pytest.mark.parametrize("make", [mlp_task, cnn_task, lstm_task], ids=["mlp", "cnn", "lstm"])
def test_default_certificate_on_reference_models(make):
    """No arguments but the radii: the certificate is sized to one epoch of the data and runs
    on every reference model (the LSTM through the loop, with one warning over two epochs)."""
    task = make()
    monitor = StationarityMonitor(radii=RADII)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_task(task, monitor, epochs=2)
    k, m = certificate_sizes(len(task.data), len(RADII), None, None)
    assert len(RADII) * k * m <= len(task.data) or k == 8  # one epoch, or the floor of 8
    assert [row["stationarity/num_samples"] for row in monitor.history] == [k, k]
    assert monitor.subset_indices is not None and len(monitor.subset_indices) == m
    for row in monitor.history:
        assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
        assert row["stationarity/grad_norm"] > 0
    loop = [w for w in caught if "Python loop of torch.autograd.grad" in str(w.message)]
    assert len(loop) == (1 if make is lstm_task else 0)
    assert monitor.vectorize is (make is not lstm_task)


def test_certificate_sizes():
    assert certificate_sizes(50_000, 2, None, None) == (24, 1024)  # 2 * 24 * 1024 <= 50,000
    assert certificate_sizes(10**6, 2, None, None) == (64, 1024)  # at most 64 samples
    assert certificate_sizes(160, 2, None, None) == (8, 10)  # 8 samples, a smaller subset
    assert certificate_sizes(160, 2, 4, None) == (4, 20)  # given k: the subset fits
    assert certificate_sizes(160, 2, None, 40) == (8, 40)  # given m: at least 8 samples
    assert certificate_sizes(160, 2, 12, 40) == (12, 40)  # both given: as given
    assert certificate_sizes(3, 4, None, None) == (8, 1)  # at least one example


def test_an_iterable_dataset_is_refused_before_the_first_batch():
    class Stream(IterableDataset):
        def __iter__(self):
            for _ in range(4):
                yield torch.randn(10), torch.randn(1)

    task = mlp_task()
    task.train_dataloader = lambda: DataLoader(Stream(), batch_size=2)  # type: ignore[method-assign]
    with pytest.raises(MisconfigurationException, match=r"Stream.*IterableDataset.*`dataset=`"):
        fit_task(task, StationarityMonitor(radii=RADII))
    assert task.steps == 0  # not after an epoch of training


def test_sigterm_stops_a_certificate_at_the_next_block():
    """Lightning's SIGTERM handler only sets trainer.received_sigterm, which the training loop
    reads between batches: a certificate now reads it between blocks of 8 gradients and ends
    the fit as Lightning does (SIGTERMException), instead of running to its end."""
    calls = []

    def loss_fn(module, batch):
        calls.append(1)
        if len(calls) == 3:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                pytest.fail("Lightning's SIGTERM handler is not installed: not sending SIGTERM")
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        return ((module(x) - y) ** 2).mean()

    monitor = StationarityMonitor(
        radii=RADII, num_samples=32, subset_size=64, loss_fn=loss_fn, vectorize=False
    )
    with pytest.raises(SIGTERMException):
        fit_task(mlp_task(), monitor)
    # f at x, then the loop: the signal arrives in the first block of 8 and stops after it
    # (the full certificate: 1 + 2 * 32 = 65 evaluations)
    assert len(calls) == 1 + 8
    assert monitor.history == []


def test_max_seconds_stops_after_the_first_block():
    """A budget smaller than one block: every radius gets the first block of 8 samples."""
    monitor = StationarityMonitor(
        radii=RADII, num_samples=32, subset_size=64, max_seconds=1e-9, vectorize=False
    )
    fit_task(mlp_task(), monitor)
    assert monitor.history[0]["stationarity/num_samples"] == 8.0
    with pytest.raises(ValueError, match="`max_seconds` must be > 0"):
        StationarityMonitor(radii=RADII, max_seconds=0)
    with pytest.raises(ValueError, match="`max_seconds` must be > 0, got nan"):
        StationarityMonitor(radii=RADII, max_seconds=float("nan"))
    with pytest.raises(TypeError, match="`max_seconds` must be a number"):
        StationarityMonitor(radii=RADII, max_seconds="1")  # type: ignore[arg-type]


def test_progress_bar_while_the_certificate_runs(capsys):
    fit_task(mlp_task(), StationarityMonitor(radii=RADII), enable_progress_bar=True)
    assert "Stationarity certificate (epoch 0)" in capsys.readouterr().err
    fit_task(
        mlp_task(), StationarityMonitor(radii=RADII)
    )  # the trainer shows no bar: neither do we
    assert "Stationarity certificate" not in capsys.readouterr().err
