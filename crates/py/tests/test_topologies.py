"""Every built-in role with Python user code: the role table, a ring (decentralised) job and a
vertical (split-learning) job through ``fledge.simulate``."""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

import fledge

REPO = pathlib.Path(__file__).resolve().parents[3]


class MeanTrainer(fledge.Trainer):
    """Exact toy: dataset URL ``toy:<target>:<samples>``; each round pulls the weight halfway
    to the target, so a sample-weighted average over rounds is known in closed form."""

    def initialize(self):
        _, target, samples = self.config.dataset_url.split(":")
        self.target, self.samples = float(target), int(samples)
        self.weights = {"w": np.zeros(1, np.float32)}

    def train(self):
        self.weights["w"] = self.weights["w"] + np.float32(0.5) * (np.float32(self.target) - self.weights["w"])
        return self.samples

    def evaluate(self):
        return {"w": float(self.weights["w"][0])}


def test_ring_job_with_python_trainers_reaches_the_weighted_mean(tmp_path):
    targets, samples, rounds = [1.0, 2.0, 3.0], [1, 1, 2], 3
    report = fledge.simulate(
        MeanTrainer,
        [f"toy:{t}:{n}" for t, n in zip(targets, samples)],
        topology="ring",
        rounds=rounds,
        hyperparameters={"joinTimeout": 60},
        workdir=tmp_path,
        timeout=120,
    )
    assert report.failures == {}, report.failures
    mean = sum(t * n for t, n in zip(targets, samples)) / sum(samples)
    # Every member starts at 0 and averages after each round: w_r = mean * (1 - 0.5^r).
    expected = mean * (1 - 0.5**rounds)
    assert report.top.kind == "ring-trainer" and report.top.rounds == rounds
    assert report.final_model["w"][0] == pytest.approx(expected, rel=1e-6)
    assert sorted(s.kind for s in report.tasks.values()) == ["ring-trainer"] * 2
    for summary in report.tasks.values():
        assert summary.rounds == rounds
        # Every member evaluated the same averaged model.
        assert summary.metric("w")[-1] == pytest.approx(expected, rel=1e-6)


N_SAMPLES = 120


def _ids():
    return [f"s{i}" for i in range(N_SAMPLES)]


def _column(party: int) -> dict:
    rng = np.random.default_rng(party)
    return {sid: float(v) for sid, v in zip(_ids(), rng.normal(size=N_SAMPLES))}


class LinearFeatureParty(fledge.FeatureParty):
    """Holds column ``x_k`` (k from the dataset URL ``toy:<k>``); its bottom model is one
    weight: embedding = w * x."""

    def load(self):
        self.k = int(self.config.dataset_url.split(":")[1])
        self.column = _column(self.k)
        self.w = 0.0
        # A party may list its ids in any order and hold extra ones.
        return list(reversed(_ids())) + [f"only-{self.k}"]

    def embedding_dim(self):
        return 1

    def align(self, train, test):
        self.x = {"train": np.array([self.column[i] for i in train], np.float32),
                  "test": np.array([self.column[i] for i in test], np.float32)}

    def embed(self, split, rows):
        x = self.x[split][rows]
        if split == "train":
            self.last = x
        return (self.w * x)[:, None]

    def backward(self, gradient):
        self.w -= 0.1 * float((gradient[:, 0] * self.last).sum())

    def get_weights(self):
        return {"w": np.array([self.w], np.float32)}


class RegressionLabelParty(fledge.LabelParty):
    """Holds y = x_0 + 2 x_1; its top model is the sum of the embeddings plus a bias."""

    def load(self):
        c0, c1 = _column(0), _column(1)
        self.y = {i: c0[i] + 2 * c1[i] for i in _ids()}
        self.b = 0.0
        return _ids()

    def align(self, train, test, dims):
        assert dims == [1, 1], dims
        self.targets = {"train": np.array([self.y[i] for i in train]), "test": np.array([self.y[i] for i in test])}

    def _pred(self, embeddings):
        return sum(e[:, 0].astype(np.float64) for e in embeddings) + self.b

    def train_step(self, rows, embeddings):
        err = self._pred(embeddings) - self.targets["train"][rows]
        grad = (2 * err / len(rows)).astype(np.float32)[:, None]
        self.b -= 0.1 * float(grad.sum())
        return float((err**2).mean()), [grad for _ in embeddings]

    def evaluate(self, rows, embeddings):
        err = self._pred(embeddings) - self.targets["test"][rows]
        return {"loss": float((err**2).mean())}

    def get_weights(self):
        return {"b": np.array([self.b], np.float32)}


def test_vertical_job_with_python_parties_learns_the_split_model(tmp_path):
    report = fledge.simulate(
        None,
        ["toy:label", "toy:0", "toy:1"],
        topology="vertical",
        feature_party=LinearFeatureParty,
        label_party=RegressionLabelParty,
        rounds=6,
        hyperparameters={"batchSize": 16, "testFraction": 0.25, "seed": 3, "joinTimeout": 60},
        workdir=tmp_path,
        timeout=120,
    )
    assert report.failures == {}, report.failures
    assert report.top.kind == "vertical-label-party" and report.top.rounds == 6
    losses = report.top.metric("loss")
    # y = x0 + 2 x1 has variance 5: the split model learnt it without the label party seeing
    # a feature or a feature party seeing a label.
    assert len(losses) == 6 and losses[-1] < min(0.1, losses[0]), losses
    assert sorted(s.kind for s in report.tasks.values()) == ["vertical-feature-party"] * 2
    for summary in report.tasks.values():
        assert summary.rounds == 6
        assert summary.metric("steps")[0] > 0
    assert list(report.final_model) == ["b"]


def test_vertical_party_errors_name_the_step(tmp_path):
    class Broken(LinearFeatureParty):
        def embed(self, split, rows):
            return np.zeros((len(rows) + 1, 1), np.float32)

    with pytest.raises(fledge.TaskError, match=r"embed\(\) must have shape"):
        fledge.simulate(
            None,
            ["toy:label", "toy:0", "toy:1"],
            topology="vertical",
            feature_party=Broken,
            label_party=RegressionLabelParty,
            rounds=1,
            hyperparameters={"joinTimeout": 10},
            workdir=tmp_path,
            timeout=60,
        )


def test_simulate_rejects_an_unknown_topology():
    with pytest.raises(fledge.ConfigError, match="topology must be"):
        fledge.simulate(MeanTrainer, ["toy:1:1"], topology="star")
    with pytest.raises(fledge.ConfigError, match="label party's dataset"):
        fledge.simulate(None, ["toy:label"], topology="vertical")


def test_builtin_roles_match_fledge_roles():
    names = fledge.builtin_roles()
    for used in ["trainer", "top-aggregator", "middle-aggregator", "ring-trainer",
                 "hybrid-trainer", "vertical-feature-party", "vertical-label-party",
                 "async-aggregator", "coordinator", "coordinated-trainer"]:
        assert used in names
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    bins = pathlib.Path(os.environ.get("FLEDGE_BIN_DIR") or target / "debug")
    if not (bins / "fledge").is_file():
        pytest.skip(f"fledge not built in {bins}")
    out = subprocess.run([bins / "fledge", "roles", "-o", "json"], check=True, capture_output=True, text=True)
    assert [r["name"] for r in json.loads(out.stdout)] == names
