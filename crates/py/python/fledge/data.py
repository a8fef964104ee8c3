"""Dataset URLs and the MNIST IDX loader used by the examples.

The URL convention is the one of Fledge's Rust reference trainers::

    file:///abs/dir[?shard=i&shards=n&partition=iid|dirichlet&alpha=0.5&seed=0&limit=m]

The directory holds ``*-train-images-idx3-ubyte[.gz]``, ``*-train-labels-idx1-ubyte[.gz]``
and the same with ``test``. ``shard``/``shards`` select shard ``i`` of ``n`` of the training
set (all trainers of a job must use the same ``seed`` so that shards are disjoint);
``partition`` is ``iid`` (default) or ``dirichlet`` label skew with ``alpha``; ``limit`` keeps
the first ``m`` training rows before the split. The test set is returned whole.
A relative path (``file:data`` or ``data``) is resolved against the current directory.
"""

from __future__ import annotations

import glob
import gzip
import os
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ._fledge import ConfigError

_KEYS = ("shard", "shards", "partition", "alpha", "seed", "limit")


@dataclass(frozen=True)
class DatasetUrl:
    """A parsed dataset URL."""

    dir: str
    shard: Optional[Tuple[int, int]] = None
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    limit: Optional[int] = None


def parse_dataset_url(url: str) -> DatasetUrl:
    """Parses ``url``; raises ``ConfigError`` naming the offending part."""

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"dataset url {url!r}: {reason}")

    path, _, query = url.partition("?")
    if "://" in path:
        scheme, _, path = path.partition("://")
        if scheme != "file":
            raise bad(f"scheme {scheme!r} is not supported (use file:///abs/dir)")
    elif path.startswith("file:"):
        path = path[len("file:"):]
    if not path:
        raise bad("the path is empty")
    path = os.path.abspath(path)
    values = {}
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        if not sep:
            raise bad(f"query part {part!r} is not key=value")
        if key not in _KEYS:
            raise bad(f"unknown query key {key!r} ({', '.join(_KEYS)})")
        values[key] = value

    def uint(key: str) -> Optional[int]:
        if key not in values:
            return None
        v = values[key]
        if not v.isdigit():
            raise bad(f"{key}={v!r} is not a non-negative integer")
        return int(v)

    shard, shards = uint("shard"), uint("shards")
    if (shard is None) != (shards is None):
        raise bad("shard and shards must be given together")
    if shard is not None and not (shards >= 1 and shard < shards):
        raise bad(f"shard={shard} is not in 0..shards={shards}")
    partition = values.get("partition", "iid")
    if partition not in ("iid", "dirichlet"):
        raise bad(f"partition={partition!r} is not iid or dirichlet")
    alpha = 0.5
    if "alpha" in values:
        try:
            alpha = float(values["alpha"])
        except ValueError:
            alpha = -1.0
        if not (np.isfinite(alpha) and alpha > 0):
            raise bad(f"alpha={values['alpha']!r} is not a positive number")
    return DatasetUrl(
        dir=path,
        shard=(shard, shards) if shard is not None else None,
        partition=partition,
        alpha=alpha,
        seed=uint("seed") or 0,
        limit=uint("limit"),
    )


def _find(dir: str, kind: str, split: str) -> str:
    pattern = f"*{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    found = sorted(glob.glob(os.path.join(dir, pattern)) + glob.glob(os.path.join(dir, pattern + ".gz")))
    if not found:
        raise ConfigError(f"no {pattern}[.gz] file in {dir}")
    return found[0]


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) of unsigned bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ConfigError(f"{path} is not an IDX file: too short")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ConfigError(f"{path}: {body.size} values for shape {dims}")
    return body.reshape(dims)


def partition_indices(labels: np.ndarray, url: DatasetUrl) -> np.ndarray:
    """The training rows of this URL's shard (all rows without a shard)."""
    n = labels.shape[0]
    if url.shard is None:
        return np.arange(n)
    shard, shards = url.shard
    rng = np.random.default_rng(url.seed)
    if url.partition == "iid":
        return np.sort(rng.permutation(n)[shard::shards])
    parts = [[] for _ in range(shards)]
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet([url.alpha] * shards))[:-1] * len(rows)).astype(int)
        for i, piece in enumerate(np.split(rows, cuts)):
            parts[i].append(piece)
    return np.sort(np.concatenate(parts[shard]))


def load_mnist(url: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of this URL's shard.

    Images are float32 rows of 784 values in [0, 1]; labels are int64.
    """
    u = parse_dataset_url(url)
    if not os.path.isdir(u.dir):
        raise ConfigError(f"dataset directory {u.dir} does not exist")

    def images(split: str) -> np.ndarray:
        x = read_idx(_find(u.dir, "images", split))
        return (x.reshape(x.shape[0], -1).astype(np.float32)) / np.float32(255.0)

    def labels(split: str) -> np.ndarray:
        return read_idx(_find(u.dir, "labels", split)).astype(np.int64)

    x_train, y_train = images("train"), labels("train")
    if u.limit is not None:
        x_train, y_train = x_train[: u.limit], y_train[: u.limit]
    rows = partition_indices(y_train, u)
    return x_train[rows], y_train[rows], images("test"), labels("test")
