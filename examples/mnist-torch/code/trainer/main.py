"""MNIST with PyTorch: a small CNN (or an MLP) trained with SGD, as a Fledge trainer.

The model's ``state_dict()`` tensors are the weights that Fledge aggregates
(``fledge.pytorch.TorchTrainer``): no conversion code here.

Runs as a task of a job (the agent calls ``python3 main.py config.json``) or locally::

    python3 main.py --simulate [--trainers 3] [--rounds 3]

Hyperparameters (job's modelSpec): ``model`` (``cnn`` or ``mlp``), ``epochs`` (1),
``batchSize`` (32), ``learningRate`` (0.1), ``seed`` (0, the initial model, the same in
every trainer). The dataset URL follows Fledge's convention (``file:///dir?shard=i&shards=n``,
see ``fledge.data``); the test set in the same directory evaluates.
"""

from __future__ import annotations

import argparse
import os
import sys

# One BLAS/OpenMP thread per trainer: several trainers share the machine (and, in a
# simulation, the process). Must be set before numpy and torch are imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import fledge  # noqa: E402
from fledge.data import load_mnist  # noqa: E402
from fledge.pytorch import TorchTrainer, to_tensors  # noqa: E402

torch.set_num_threads(1)


def build_model(kind: str, seed: int) -> nn.Module:
    """The same initial weights in every trainer for the same ``seed``."""
    torch.manual_seed(seed)
    if kind == "cnn":  # 20,522 parameters
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10),
        )
    if kind == "mlp":  # 101,770 parameters, the layout of examples/mnist-numpy
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    raise ValueError(f"hyperparameter model must be 'cnn' or 'mlp', not {kind!r}")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    logits = model(x)
    return {
        "loss": float(F.cross_entropy(logits, y)),
        "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
    }


class MnistTorchTrainer(TorchTrainer):
    """Trains ``self.model`` on this task's shard; evaluates on the test set."""

    def initialize(self):
        self.epochs = int(self.config.get("epochs", 1))
        self.batch_size = int(self.config.get("batchSize", 32))
        self.lr = float(self.config.get("learningRate", 0.1))
        seed = int(self.config.get("seed", 0))
        self.model = build_model(str(self.config.get("model", "cnn")), seed)
        # The parameters stay the same objects across rounds (set_weights copies into
        # them), so one optimizer serves the whole run.
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.0)
        self.generator = torch.Generator().manual_seed(seed + 1 + self.config.task_index)

    def load_data(self):
        if not self.config.dataset_url:
            raise ValueError(f"task {self.config.task_id} has no dataset")
        x, y, x_test, y_test = load_mnist(self.config.dataset_url)
        # torch.from_numpy shares the arrays' memory: no copy of the data set.
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.x_test, self.y_test = torch.from_numpy(x_test), torch.from_numpy(y_test)

    def train(self):
        self.model.train()
        losses = []
        for _ in range(self.epochs):
            order = torch.randperm(len(self.y), generator=self.generator)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                self.optimizer.zero_grad()
                loss = F.cross_entropy(self.model(self.x[batch]), self.y[batch])
                loss.backward()
                self.optimizer.step()
                losses.append(loss.item())
        return len(self.y), {"loss": float(np.mean(losses)) if losses else 0.0}

    def evaluate(self):
        return evaluate(self.model, self.x_test, self.y_test)


def _local(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    default_data = os.path.normpath(os.path.join(here, "..", "..", "..", "data"))
    p = argparse.ArgumentParser(description="simulate the MNIST PyTorch job locally")
    p.add_argument("--simulate", action="store_true", required=True)
    p.add_argument("--trainers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--data", default=default_data)
    args = p.parse_args(argv)
    urls = [
        f"file://{os.path.abspath(args.data)}?shard={i}&shards={args.trainers}"
        for i in range(args.trainers)
    ]
    report = fledge.simulate(
        MnistTorchTrainer,
        urls,
        rounds=args.rounds,
        hyperparameters={"model": args.model, "epochs": args.epochs, "learningRate": args.lr},
    )
    # The global model, back into a module: to_tensors shares the Rust buffers' memory.
    model = build_model(args.model, 0)
    model.load_state_dict(to_tensors(report.final_model))
    _, _, x_test, y_test = load_mnist(urls[0])
    print(evaluate(model, torch.from_numpy(x_test), torch.from_numpy(y_test)))


if __name__ == "__main__":
    if "--simulate" in sys.argv[1:]:
        _local(sys.argv[1:])
    else:
        fledge.run(MnistTorchTrainer)
