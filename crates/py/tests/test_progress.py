"""Per-round progress (callback and default line) and Rust logs through Python's logging."""

import logging

import pytest

import fledge


def urls(data_dir, n, limit=300):
    return [f"file://{data_dir}?shard={i}&shards={n}&limit={limit}" for i in range(n)]


HYPER = {"hidden": 0, "learningRate": 0.1}


def test_the_callback_sees_each_round_of_the_global_model_once(data_dir, example, tmp_path):
    seen = []
    report = fledge.simulate(
        example.MnistTrainer,
        urls(data_dir, 2),
        rounds=3,
        hyperparameters={**HYPER, "testData": urls(data_dir, 1)[0]},
        evaluator=example.MnistEvaluator,
        workdir=tmp_path,
        timeout=300,
        progress=seen.append,
    )
    assert report.failures == {}
    assert [p.round for p in seen] == [1, 2, 3]
    assert all(isinstance(p, fledge.RoundProgress) for p in seen)
    # Only the top aggregator's records: one per round of the job.
    assert {(p.task_id, p.role) for p in seen} == {
        (r["taskId"], r["role"]) for r in report.top.history
    }
    assert len({p.task_id for p in seen}) == 1
    assert all(p.rounds == 3 for p in seen)
    elapsed = [p.elapsed for p in seen]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # What the callback got is what the run recorded: the evaluator's score of the global model.
    assert [p.metrics["global.accuracy"] for p in seen] == report.top.metric("global.accuracy")
    assert all(p.metrics["roundSeconds"] >= 0 for p in seen)


def test_the_default_progress_line_goes_to_stderr(data_dir, example, tmp_path, capfd):
    fledge.simulate(
        example.MnistTrainer, urls(data_dir, 2), rounds=2, hyperparameters=HYPER,
        workdir=tmp_path, timeout=300,
    )
    lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("fledge: round")]
    assert [l.split()[2] for l in lines] == ["1/2", "2/2"], lines
    assert all("trainer.train_loss" in l for l in lines), lines
    assert "global.accuracy" not in lines[0], "no evaluator, so no figure for the global model"


def test_progress_false_is_silent(data_dir, example, tmp_path, capfd):
    fledge.simulate(
        example.MnistTrainer, urls(data_dir, 2), rounds=1, hyperparameters=HYPER,
        workdir=tmp_path, timeout=300, progress=False,
    )
    assert "fledge: round" not in capfd.readouterr().err


def test_an_exception_in_the_callback_stops_the_run_and_propagates(data_dir, example, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_first(p):
        if p.round == 1:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        fledge.simulate(
            example.MnistTrainer, urls(data_dir, 2), rounds=50, hyperparameters=HYPER,
            workdir=tmp_path, timeout=300, progress=stop_after_first,
        )


def test_a_progress_that_is_not_callable_is_a_config_error(data_dir, example, tmp_path):
    with pytest.raises(fledge.ConfigError, match="progress must be"):
        fledge.simulate(
            example.MnistTrainer, urls(data_dir, 2), rounds=1, workdir=tmp_path, progress="yes"
        )


def test_rust_logs_reach_python_logging(data_dir, example, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fledge_sdk")
    fledge.simulate(
        example.MnistTrainer, urls(data_dir, 2), rounds=1, hyperparameters=HYPER,
        workdir=tmp_path, timeout=300, progress=False,
    )
    records = [r for r in caplog.records if r.name.startswith("fledge_sdk.")]
    assert any(r.name == "fledge_sdk.roles.aggregator" and r.levelno == logging.INFO
               for r in records), [(r.name, r.getMessage()) for r in records]
    # A quieter configuration takes effect on the next run.
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="fledge_sdk")
    fledge.simulate(
        example.MnistTrainer, urls(data_dir, 2), rounds=1, hyperparameters=HYPER,
        workdir=tmp_path, timeout=300, progress=False,
    )
    assert not [r for r in caplog.records
                if r.name.startswith("fledge_sdk.") and r.levelno < logging.WARNING]
