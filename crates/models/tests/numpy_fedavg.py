"""FedAvg of the 784-128-10 MLP in plain numpy: the reference that
``reference_fedavg.rs`` checks Fledge against.

Usage: numpy_fedavg.py DIR MNIST_DIR. DIR holds what the Rust test wrote: raw
files ``init-<tensor>.f32`` (little-endian float32, PyTorch layout), ``setup.json`` (rounds, lr,
batch size, every trainer's row indices into the training set and every round's row order of
each trainer). Prints ``{"accuracy": ..., "loss": ...}`` of the global model after the last
round on the 2,000 test digits.

The arithmetic is the textbook one: float32 forward and backward passes, mean cross-entropy per
minibatch, plain SGD steps, and a sample-weighted mean of the trainers' weights per round.
"""

import gzip
import json
import sys
from pathlib import Path

import numpy as np

NAMES = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(mnist: Path, split: str):
    x = idx(mnist / f"mnist10k-{split}-images-idx3-ubyte.gz").reshape(-1, 784)
    y = idx(mnist / f"mnist10k-{split}-labels-idx1-ubyte.gz")
    return x.astype(np.float32) / np.float32(255.0), y.astype(np.int64)


def forward(w, x):
    h = x @ w["fc1.weight"].T + w["fc1.bias"]
    a = np.maximum(h, 0)
    z = a @ w["fc2.weight"].T + w["fc2.bias"]
    return h, a, z


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def sgd_step(w, x, y, lr):
    h, a, z = forward(w, x)
    p = np.exp(log_softmax(z))
    p[np.arange(len(y)), y] -= 1
    dz = (p / np.float32(len(y))).astype(np.float32)
    da = dz @ w["fc2.weight"]
    dh = da * (h > 0)
    grads = {"fc2.weight": dz.T @ a, "fc2.bias": dz.sum(0), "fc1.weight": dh.T @ x, "fc1.bias": dh.sum(0)}
    for name in NAMES:
        w[name] = (w[name] - np.float32(lr) * grads[name]).astype(np.float32)


def main() -> None:
    out, mnist = Path(sys.argv[1]), Path(sys.argv[2])
    setup = json.loads((out / "setup.json").read_text())
    shapes = setup["shapes"]
    init = {n: np.fromfile(out / f"init-{n}.f32", dtype="<f4").reshape(shapes[n]) for n in NAMES}
    x, y = load(mnist, "train")
    x_test, y_test = load(mnist, "test")
    shards = [np.asarray(rows) for rows in setup["shards"]]
    sizes = np.array([len(rows) for rows in shards], dtype=np.float64)
    global_w = init
    for r in range(setup["rounds"]):
        local = []
        for t, rows in enumerate(shards):
            w = {n: v.copy() for n, v in global_w.items()}
            xs, ys = x[rows], y[rows]
            for order in setup["orders"][t][r]:
                order = np.asarray(order)
                for start in range(0, len(order), setup["batchSize"]):
                    batch = order[start : start + setup["batchSize"]]
                    sgd_step(w, xs[batch], ys[batch], setup["lr"])
            local.append(w)
        global_w = {
            n: (sum(s * lw[n].astype(np.float64) for s, lw in zip(sizes, local)) / sizes.sum()).astype(np.float32)
            for n in NAMES
        }
    _, _, z = forward(global_w, x_test)
    loss = float(-log_softmax(z)[np.arange(len(y_test)), y_test].mean())
    accuracy = float((z.argmax(axis=1) == y_test).mean())
    print(json.dumps({"accuracy": accuracy, "loss": loss}))


if __name__ == "__main__":
    main()
