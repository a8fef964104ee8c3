"""Per-round overhead of a Python trainer on the Rust data plane.

Runs two in-process simulations of the same job shape (N trainers, R rounds, the 784-128-10
MLP layout of the MNIST examples, ~100k float32 parameters):

- ``noop``: trainers whose ``train()`` does nothing, so a round is pure overhead: the GIL,
  weights crossing Python <-> Rust, channels and aggregation.
- ``numpy``: the numpy MLP of ``examples/mnist-numpy`` (1 epoch per round).

- ``rust``: the Rust reference trainer (candle, the same MLP) on the same job, run as
  ``fledge run-task --simulate --trainers N --rounds R --epochs 1`` (binary from
  ``$FLEDGE_BIN_DIR``, default ``target/debug``; skipped when it is missing).

and prints the mean wall time per round of each, all measured in this one run. Each figure
is ``(time of R + 1 rounds - time of 1 round) / R``, so start-up and data loading cancel.

    python3 examples/python-local/overhead.py [--trainers 3] [--rounds 5]
"""

import argparse
import importlib.util
import os
import re
import subprocess
import tempfile
import time

# One BLAS thread per trainer (see examples/mnist-numpy/code/trainer/main.py).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import fledge  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "data"))
spec = importlib.util.spec_from_file_location(
    "mnist_numpy", os.path.join(HERE, "..", "mnist-numpy", "code", "trainer", "main.py")
)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


class Noop(fledge.Trainer):
    """Same weights as the MLP, no computation."""

    def initialize(self):
        self.weights = example.init_mlp(128, 0)

    def train(self):
        return 1


def timed(trainer, n, rounds):
    urls = [f"file://{DATA}?shard={i}&shards={n}" for i in range(n)]
    hyper = {"epochs": 1, "batchSize": 32, "learningRate": 0.1}
    # A one-round warm-up run absorbs start-up costs (data loading is per run, so included).
    start = time.perf_counter()
    fledge.simulate(trainer, urls, rounds=1, hyperparameters=hyper)
    one = time.perf_counter() - start
    start = time.perf_counter()
    report = fledge.simulate(trainer, urls, rounds=rounds + 1, hyperparameters=hyper)
    total = time.perf_counter() - start
    return (total - one) / rounds, report


def timed_rust(n, rounds):
    """Seconds per round of the Rust reference trainer and its final accuracy, or None."""
    bins = os.environ.get("FLEDGE_BIN_DIR") or os.path.join(HERE, "..", "..", "target", "debug")
    fledge_bin = os.path.join(bins, "fledge")
    if not os.path.isfile(fledge_bin):
        print(f"({fledge_bin} is missing: cargo build -p fledge, or set FLEDGE_BIN_DIR)")
        return None

    def run(r):
        with tempfile.TemporaryDirectory(prefix="fledge-overhead-") as workdir:
            cmd = [
                fledge_bin, "run-task", "--simulate", "--trainers", str(n), "--rounds", str(r),
                "--epochs", "1", "--data", DATA, "--workdir", workdir,
            ]
            start = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, FLEDGE_LOG="warn"))
            elapsed = time.perf_counter() - start
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}{res.stderr}")
        found = re.search(r"final test accuracy ([0-9.]+)", res.stdout + res.stderr)
        return elapsed, float(found.group(1)) if found else float("nan")

    one, _ = run(1)
    total, acc = run(rounds + 1)
    return (total - one) / rounds, acc


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("FLEDGE_LOG", "warn")
    noop, _ = timed(Noop, args.trainers, args.rounds)
    mlp, report = timed(example.MnistTrainer, args.trainers, args.rounds)
    _, _, x_test, y_test = fledge.data.load_mnist(f"file://{DATA}")
    acc = example.evaluate(report.final_model, x_test, y_test)["accuracy"]
    rust = timed_rust(args.trainers, args.rounds)
    print(f"{'trainer':<12} {'s/round':>10}")
    print(f"{'python noop':<12} {noop:>10.4f}")
    print(f"{'python mlp':<12} {mlp:>10.4f}   (numpy, final accuracy {acc:.3f})")
    if rust is not None:
        print(f"{'rust mlp':<12} {rust[0]:>10.4f}   (candle, final accuracy {rust[1]:.3f})")


if __name__ == "__main__":
    main()
