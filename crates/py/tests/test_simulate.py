"""Local runs over the in-process backend with the numpy MNIST example."""

import numpy as np
import pytest

import fledge


def urls(data_dir, n, limit=None):
    extra = f"&limit={limit}" if limit else ""
    return [f"file://{data_dir}?shard={i}&shards={n}{extra}" for i in range(n)]


def test_three_numpy_trainers_reach_085_test_accuracy(data_dir, example, tmp_path):
    report = fledge.simulate(
        example.MnistTrainer,
        urls(data_dir, 3),
        rounds=3,
        hyperparameters={"epochs": 1, "batchSize": 32, "learningRate": 0.1, "hidden": 64},
        workdir=tmp_path,
        timeout=300,
    )
    assert report.failures == {}
    assert report.top.kind == "top-aggregator" and report.top.rounds == 3
    assert sorted(report.tasks) == ["sim-trainer-0", "sim-trainer-1", "sim-trainer-2"]
    for summary in report.tasks.values():
        assert summary.kind == "trainer" and summary.rounds == 3
        # Trainer metrics arrive as reported by train() (prefixed) and evaluate(), which runs
        # on the received model before training and on the trained one after.
        assert len(summary.metric("train_loss")) == 3
        assert len(summary.metric("beforeTraining.accuracy")) == 3
        assert len(summary.metric("afterTraining.accuracy")) == 3
    model = report.final_model
    assert list(model) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert model["fc1.weight"].shape == (64, 784) and model["fc1.weight"].dtype == np.float32
    _, _, x_test, y_test = fledge.data.load_mnist(urls(data_dir, 1)[0])
    accuracy = example.evaluate(model, x_test, y_test)["accuracy"]
    assert accuracy >= 0.85, accuracy
    # The trainers' locally trained models of the last round.
    last = [s.metric("afterTraining.accuracy")[-1] for s in report.tasks.values()]
    assert min(last) >= 0.8, last
    assert (tmp_path / "registry").exists()


def test_three_tier_with_server_side_evaluator(data_dir, example, tmp_path):
    report = fledge.simulate(
        example.MnistTrainer,
        urls(data_dir, 4, limit=800),
        rounds=2,
        middle=2,
        hyperparameters={"hidden": 0, "learningRate": 0.1, "testData": urls(data_dir, 1)[0]},
        evaluator=example.MnistEvaluator,
        workdir=tmp_path,
        timeout=300,
    )
    assert report.failures == {}
    assert report.top.rounds == 2
    kinds = sorted(s.kind for s in report.tasks.values())
    assert kinds == ["middle-aggregator"] * 2 + ["trainer"] * 4
    # The evaluator scored the global model after every round.
    assert len(report.top.metric("global.accuracy")) == 2, report.top.history
    assert 0.0 < report.top.metric("global.accuracy")[-1] <= 1.0
    assert list(report.final_model) == ["fc1.weight", "fc1.bias"]


def test_simulate_rejects_bad_arguments(data_dir, example):
    with pytest.raises(fledge.ConfigError, match="rounds must be a positive int"):
        fledge.simulate(example.MnistTrainer, urls(data_dir, 1), rounds=0)
    with pytest.raises(fledge.ConfigError, match="at least one trainer"):
        fledge.simulate(example.MnistTrainer, [])
    with pytest.raises(fledge.ConfigError, match="list of dataset URLs"):
        fledge.simulate(example.MnistTrainer, "file:///x")
    with pytest.raises(fledge.ConfigError, match="must be a class"):
        fledge.simulate(example.MnistTrainer(), urls(data_dir, 1))
    with pytest.raises(fledge.ConfigError, match="middle aggregators"):
        fledge.simulate(example.MnistTrainer, urls(data_dir, 1), middle=2)
