"""Getting started: train a small ReLU network with PolyakSGD and watch its layer balance.

python examples/getting_started.py [OUT]     # OUT defaults to runs/getting_started
"""

import sys

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_momentum import PolyakSGD
from torch_momentum.callbacks import LayerBalanceMonitor, plot_balance


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        # bias-free ReLU layers: the layer-balance law (Du, Hu & Lee 2018) holds exactly
        self.net = nn.Sequential(
            nn.Linear(20, 64, bias=False), nn.ReLU(),
            nn.Linear(64, 64, bias=False), nn.ReLU(),
            nn.Linear(64, 3, bias=False),
        )  # fmt: skip

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return PolyakSGD(self.parameters(), lr=0.05, momentum=0.9)  # a drop-in for torch's SGD


torch.manual_seed(0)
x = torch.randn(512, 20)
y = (x[:, :3] ** 2).argmax(dim=1)  # three classes that no linear model separates
loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

monitor = LayerBalanceMonitor(layers=["net.0", "net.2", "net.4"], ledger=True)
logger = CSVLogger(sys.argv[1] if len(sys.argv) > 1 else "runs", name="getting_started")
trainer = L.Trainer(max_epochs=20, log_every_n_steps=5, logger=logger, callbacks=[monitor])
trainer.fit(Classifier(), loader)

# The figure, redrawn from the logged CSV (the monitor also saved balance.png and ledger.png there)
plot_balance(f"{logger.log_dir}/metrics.csv").savefig(f"{logger.log_dir}/balance_from_csv.png")
last = monitor.history[-1]
for pair in ("net.0-net.2", "net.2-net.4"):
    terms = {t: last[f"ledger/{t}/{pair}"] for t in ("momentum", "discretisation", "closure")}
    print(pair, {t: f"{v:+.3g}" for t, v in terms.items()})
print("figures and metrics.csv in", logger.log_dir)
