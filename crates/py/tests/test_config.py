"""Task config parsing and the dataset URL convention."""

import json

import pytest

import fledge
from fledge.data import DatasetUrl, parse_dataset_url

from conftest import task_config


def test_config_exposes_identity_hyperparameters_and_dataset(config_json, tmp_path):
    config = fledge.Config.from_json(config_json)
    assert config.task_id == "job1-trainer-0"
    assert config.job_id == "job1"
    assert config.job_name == "job one"
    assert config.role == "trainer"
    assert config.task_index == 0
    assert config.hyperparameters == {"rounds": 2, "learningRate": 0.5}
    assert config.get("learningRate") == 0.5
    assert config.get("missing", 7) == 7
    assert config.dataset_url == "file:///data?shard=0&shards=2"
    # Defaults are filled in by the Rust side.
    assert config.raw["selector"]["sort"] == "default"
    path = tmp_path / "config.json"
    path.write_text(config_json)
    assert fledge.parse_config(path) == config
    assert fledge.parse_config(config_json) == config


def test_config_without_dataset_has_no_url():
    config = fledge.Config.from_json(json.dumps(task_config(dataset=None, role="aggregator")))
    assert config.dataset_url is None and config.dataset is None


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"taskIndex": "first"}, "taskIndex"),
        ({"job": {"name": "no id"}}, "id"),
        ({"backend": "carrier-pigeon"}, "backend"),
        ({"hyperparameters": [1, 2]}, "hyperparameters"),
    ],
)
def test_bad_config_names_the_field(change, expected):
    with pytest.raises(fledge.ConfigError, match=expected):
        fledge.Config.from_json(json.dumps(task_config(**change)))


def test_config_that_is_not_json_is_a_config_error():
    with pytest.raises(fledge.ConfigError, match="task config is invalid"):
        fledge.Config.from_json("{not json")
    with pytest.raises(fledge.ConfigError, match="taskId"):
        fledge.Config.from_json("{}")


def test_dataset_url_convention(tmp_path):
    url = parse_dataset_url(f"file://{tmp_path}?shard=1&shards=3&partition=dirichlet&alpha=0.3&seed=7&limit=100")
    assert url == DatasetUrl(str(tmp_path), (1, 3), "dirichlet", 0.3, 7, 100)
    assert parse_dataset_url(str(tmp_path)) == DatasetUrl(str(tmp_path))


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://host/x", "scheme 'http'"),
        ("file:///d?shard=1", "together"),
        ("file:///d?shard=3&shards=3", "not in 0..shards=3"),
        ("file:///d?partition=zipf", "partition='zipf'"),
        ("file:///d?alpha=-1", "alpha"),
        ("file:///d?seed=x", "seed='x'"),
        ("file:///d?color=red", "unknown query key 'color'"),
        ("file:///d?shard", "not key=value"),
    ],
)
def test_bad_dataset_urls_name_the_part(url, expected):
    with pytest.raises(fledge.ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        parse_dataset_url(url)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_shards_are_disjoint_and_cover_the_training_set(partition):
    import numpy as np
    from fledge.data import partition_indices

    labels = np.random.default_rng(0).integers(0, 10, 1000)
    parts = [
        partition_indices(labels, parse_dataset_url(f"file:///d?shard={i}&shards=4&partition={partition}&seed=3"))
        for i in range(4)
    ]
    together = np.concatenate(parts)
    assert len(together) == 1000 and len(np.unique(together)) == 1000


def test_load_mnist_shard(data_dir):
    from fledge.data import load_mnist

    x, y, x_test, y_test = load_mnist(f"file://{data_dir}?shard=1&shards=3&limit=900")
    assert x.dtype.name == "float32" and x.shape == (300, 784) and y.shape == (300,)
    assert x_test.shape == (2000, 784) and y_test.shape == (2000,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(y.tolist()) <= set(range(10))
    with pytest.raises(fledge.ConfigError, match="does not exist"):
        load_mnist("file:///no/such/dir")
