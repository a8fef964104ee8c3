"""Failures in user code surface with their message and traceback."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fledge

from conftest import task_config


class Tiny(fledge.Trainer):
    def initialize(self):
        self.weights = {"w": np.zeros((2, 2), np.float32)}

    def train(self):
        self.weights["w"] += 1.0
        return 10


class BrokenTrain(Tiny):
    def train(self):
        raise ValueError("boom in round %d" % self.round)


class BadReturn(Tiny):
    def train(self):
        return "ten"


def test_exception_in_train_fails_the_job_with_message_and_traceback(tmp_path):
    with pytest.raises(fledge.TaskError) as info:
        fledge.simulate(BrokenTrain, ["d0", "d1"], rounds=2, workdir=tmp_path, timeout=60)
    msg = str(info.value)
    assert "ValueError: boom in round 1" in msg, msg
    assert "Traceback (most recent call last)" in msg, msg
    assert "in train" in msg, msg


def test_wrong_return_type_is_reported(tmp_path):
    with pytest.raises(fledge.TaskError, match="non-negative int number of samples, not 'ten'"):
        fledge.simulate(BadReturn, ["d0"], rounds=1, workdir=tmp_path, timeout=60)


def test_tiny_trainer_runs_and_update_metrics_are_reported(tmp_path):
    class Reporting(Tiny):
        def train(self):
            self.update_metrics({"lr": 0.5})
            return super().train() - 6, {"loss": 1.25}

        def evaluate(self):
            return {"accuracy": np.float32(0.5)}

    report = fledge.simulate(Reporting, ["a", "b"], rounds=2, workdir=tmp_path, timeout=60)
    # Two trainers each add 1 to the global model per round: FedAvg keeps the mean.
    np.testing.assert_array_equal(report.final_model["w"], np.full((2, 2), 2.0, np.float32))
    trainer = report.tasks["sim-trainer-0"]
    assert trainer.metric("train_lr") == [0.5, 0.5]
    assert trainer.metric("train_loss") == [1.25, 1.25]
    assert trainer.metric("afterTraining.accuracy") == [0.5, 0.5]
    assert trainer.metric("beforeTraining.accuracy") == [0.5, 0.5]


def run_main(tmp_path, body, config):
    main = tmp_path / "main.py"
    main.write_text(textwrap.dedent(body))
    path = tmp_path / "config.json"
    path.write_text(config)
    return subprocess.run(
        [sys.executable, str(main), str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )


def test_run_prints_the_traceback_and_exits_non_zero(tmp_path):
    res = run_main(
        tmp_path,
        """
        import fledge

        class Broken(fledge.Trainer):
            def initialize(self):
                raise RuntimeError("cannot build model for " + self.config.task_id)

        fledge.run(Broken)
        """,
        json.dumps(task_config()),
    )
    assert res.returncode == 2, res
    assert "RuntimeError: cannot build model for job1-trainer-0" in res.stderr, res.stderr
    assert "Traceback (most recent call last)" in res.stderr, res.stderr


def test_run_with_a_bad_config_exits_64(tmp_path):
    res = run_main(tmp_path, "import fledge\nfledge.run(fledge.Trainer)\n", '{"role": 1}')
    assert res.returncode == 64, res
    assert "task config is invalid" in res.stderr, res.stderr


def test_run_without_exit_on_error_raises_task_error_instead(tmp_path):
    res = run_main(
        tmp_path,
        """
        import fledge

        class Broken(fledge.Trainer):
            def initialize(self):
                raise RuntimeError("cannot build model")

        try:
            fledge.run(Broken, exit_on_error=False)
        except fledge.TaskError as e:
            print("caught:", "RuntimeError: cannot build model" in str(e))
        """,
        json.dumps(task_config()),
    )
    # The process went on after the failure: user code decides what to do with it.
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "caught: True", res
