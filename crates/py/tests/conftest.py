"""Shared fixtures: the repository's MNIST data and the numpy example trainer."""

import importlib.util
import json
import os
import pathlib

# Several trainers share this process: one BLAS thread each (set before numpy is imported).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
DATA = REPO / "examples" / "data"
EXAMPLE = REPO / "examples" / "mnist-numpy" / "code" / "trainer" / "main.py"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    assert (DATA / "mnist10k-train-images-idx3-ubyte.gz").exists(), DATA
    return DATA


@pytest.fixture(scope="session")
def example():
    """The module examples/mnist-numpy/code/trainer/main.py."""
    spec = importlib.util.spec_from_file_location("mnist_numpy_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_config(**overrides) -> dict:
    """A minimal valid trainer task config on the local backend."""
    config = {
        "taskId": "job1-trainer-0",
        "role": "trainer",
        "taskIndex": 0,
        "job": {"id": "job1", "name": "job one"},
        "backend": "local",
        "channels": [
            {
                "name": "param-channel",
                "pair": ["aggregator", "trainer"],
                "funcTags": {
                    "aggregator": ["distribute", "aggregate"],
                    "trainer": ["fetch", "upload"],
                },
            }
        ],
        "hyperparameters": {"rounds": 2, "learningRate": 0.5},
        "dataset": {"id": "d0", "name": "shard 0", "url": "file:///data?shard=0&shards=2", "dataFormat": "mnist-idx"},
    }
    config.update(overrides)
    return config


@pytest.fixture
def config_json() -> str:
    return json.dumps(task_config())
