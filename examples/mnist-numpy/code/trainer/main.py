"""MNIST with numpy only: a 784-128-10 MLP trained with minibatch SGD, as a Fledge trainer.

Runs as a task of a job (the agent calls ``python3 main.py config.json``) or locally::

    python3 main.py --simulate [--trainers 3] [--rounds 5]

Hyperparameters (job's modelSpec): ``epochs`` (1), ``batchSize`` (32), ``learningRate``
(0.1), ``hidden`` (128; 0 makes it softmax regression), ``seed`` (0, the initial model).
The dataset URL follows Fledge's convention (``file:///dir?shard=i&shards=n&...``, see
``fledge.data``); the test set in the same directory evaluates.
"""

from __future__ import annotations

import argparse
import os
import sys

# One BLAS thread per trainer: several trainers share the machine (and, in a simulation, the
# process); letting each spawn a BLAS thread per core oversubscribes it about 30 times over
# for these small matrices. Must be set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import fledge  # noqa: E402
from fledge.data import load_mnist  # noqa: E402


def init_mlp(hidden: int, seed: int) -> dict:
    """He-uniform weights, zero biases, named like a PyTorch ``state_dict``."""
    rng = np.random.default_rng(seed)
    sizes = [784, hidden, 10] if hidden > 0 else [784, 10]
    weights = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = np.sqrt(6.0 / fan_in)
        weights[f"fc{i + 1}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        weights[f"fc{i + 1}.bias"] = np.zeros(fan_out, dtype=np.float32)
    return weights


def layers(weights: dict) -> int:
    return len(weights) // 2


def forward(weights: dict, x: np.ndarray):
    """Logits and the activations of every layer (input first)."""
    acts = [x]
    h = x
    n = layers(weights)
    for i in range(1, n + 1):
        h = h @ weights[f"fc{i}.weight"].T + weights[f"fc{i}.bias"]
        if i < n:
            h = np.maximum(h, 0.0)
            acts.append(h)
    return h, acts


def softmax_xent(logits: np.ndarray, y: np.ndarray):
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.log(p[rows, y] + 1e-12).mean())
    p[rows, y] -= 1.0
    return loss, p / len(y)


def sgd_step(weights: dict, x: np.ndarray, y: np.ndarray, lr: float) -> float:
    logits, acts = forward(weights, x)
    loss, grad = softmax_xent(logits, y)
    for i in range(layers(weights), 0, -1):
        w = weights[f"fc{i}.weight"]
        gw = grad.T @ acts[i - 1]
        gb = grad.sum(axis=0)
        if i > 1:
            grad = (grad @ w) * (acts[i - 1] > 0)
        w -= lr * gw
        weights[f"fc{i}.bias"] -= lr * gb
    return loss


def evaluate(weights: dict, x: np.ndarray, y: np.ndarray) -> dict:
    logits, _ = forward(weights, x)
    loss, _ = softmax_xent(logits, y)
    return {"loss": loss, "accuracy": float((logits.argmax(axis=1) == y).mean())}


class MnistTrainer(fledge.Trainer):
    """Trains the MLP on this task's shard; evaluates on the test set."""

    def initialize(self):
        self.epochs = int(self.config.get("epochs", 1))
        self.batch_size = int(self.config.get("batchSize", 32))
        self.lr = float(self.config.get("learningRate", 0.1))
        hidden = int(self.config.get("hidden", 128))
        seed = int(self.config.get("seed", 0))
        self.weights = init_mlp(hidden, seed)
        self.rng = np.random.default_rng(seed + 1 + self.config.task_index)

    def load_data(self):
        if not self.config.dataset_url:
            raise ValueError(f"task {self.config.task_id} has no dataset")
        self.x, self.y, self.x_test, self.y_test = load_mnist(self.config.dataset_url)

    def train(self):
        losses = []
        for _ in range(self.epochs):
            order = self.rng.permutation(len(self.y))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                losses.append(sgd_step(self.weights, self.x[batch], self.y[batch], self.lr))
        return len(self.y), {"loss": float(np.mean(losses)) if losses else 0.0}

    def evaluate(self):
        return evaluate(self.weights, self.x_test, self.y_test)


class MnistEvaluator(fledge.Evaluator):
    """Server-side evaluation of the global model on the test set (``testData`` URL)."""

    def initialize(self):
        url = self.config.get("testData")
        if not url:
            raise ValueError("hyperparameter testData (a dataset URL) is required")
        _, _, self.x_test, self.y_test = load_mnist(url)

    def evaluate(self, weights):
        return evaluate(weights, self.x_test, self.y_test)


def _local(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    default_data = os.path.normpath(os.path.join(here, "..", "..", "..", "data"))
    p = argparse.ArgumentParser(description="simulate the MNIST numpy job locally")
    p.add_argument("--simulate", action="store_true", required=True)
    p.add_argument("--trainers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--data", default=default_data)
    args = p.parse_args(argv)
    urls = [f"file://{os.path.abspath(args.data)}?shard={i}&shards={args.trainers}" for i in range(args.trainers)]
    report = fledge.simulate(
        MnistTrainer,
        urls,
        rounds=args.rounds,
        hyperparameters={"epochs": args.epochs, "batchSize": 32, "learningRate": 0.1},
    )
    _, _, x_test, y_test = load_mnist(urls[0])
    print(evaluate(report.final_model, x_test, y_test))


if __name__ == "__main__":
    if "--simulate" in sys.argv[1:]:
        _local(sys.argv[1:])
    else:
        fledge.run(MnistTrainer)
