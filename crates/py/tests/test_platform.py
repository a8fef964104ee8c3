"""End to end through the platform: ``fledge standalone`` runs the jobs, its workers run
``python main.py`` with this interpreter (``FLEDGE_PYTHON``), ``fledgectl`` submits and reads
them back.

- ``examples/mnist-numpy`` (4 numpy trainers, the built-in aggregator, 5 rounds over the
  embedded MQTT broker) must end ``completed`` with a test accuracy of at least 0.85.
- ``examples/mnist-torch`` likewise, where torch is installed.
- The numpy job with a trainer whose ``train()`` raises must end ``failed``, with the Python
  traceback in the failed tasks' log tails.

The binaries come from the cargo build (``cargo build -p fledge -p fledge-cli``, or the
workspace's ``cargo nextest run`` in ``scripts/test-all``): ``$FLEDGE_BIN_DIR``, default
``$CARGO_TARGET_DIR/debug`` or ``target/debug``. Without them these tests are skipped.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import REPO

EXAMPLE_DIR = REPO / "examples" / "mnist-numpy"

# Generous bounds that only turn a hang into a failure; nothing here asserts a duration.
START_TIMEOUT = 120
JOB_TIMEOUT = 300


def bin_dir() -> pathlib.Path:
    if os.environ.get("FLEDGE_BIN_DIR"):
        return pathlib.Path(os.environ["FLEDGE_BIN_DIR"])
    return pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "debug"


class Platform:
    """A running ``fledge standalone`` on free loopback ports in a temporary directory."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        bins = bin_dir()
        self.fledge_bin = bins / "fledge"
        self.fledgectl_bin = bins / "fledgectl"
        self.cli_config = root / "cli.yaml"
        env = dict(os.environ)
        # Workers run each role folder's main.py with this interpreter, which has `fledge`.
        env["FLEDGE_PYTHON"] = sys.executable
        env.setdefault("FLEDGE_LOG", "info")
        self.log_path = root / "standalone.log"
        self._stderr = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                str(self.fledge_bin), "standalone", "--port", "0",
                "--data-dir", str(root / "data"), "--cli-config", str(self.cli_config),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
        )
        lines: "queue.Queue[str | None]" = queue.Queue()

        def read():
            for line in self.process.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        self.endpoint = None
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                self.stop()
                pytest.fail(f"fledge standalone did not print ready:\n{self.log()}")
            if line is None:
                self.stop()
                pytest.fail(f"fledge standalone exited before ready:\n{self.log()}")
            if line.startswith("endpoint: "):
                self.endpoint = line.removeprefix("endpoint: ")
            if line == "ready":
                break
        assert self.endpoint, "standalone prints its endpoint"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()

    def fledgectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = dict(os.environ, FLEDGE_CONFIG=str(self.cli_config))
        return subprocess.run(
            [str(self.fledgectl_bin), *args], capture_output=True, text=True, env=env, timeout=timeout
        )

    def json(self, *args: str):
        res = self.fledgectl("-o", "json", *args)
        assert res.returncode == 0, f"fledgectl {' '.join(args)}: {res.stderr}"
        return json.loads(res.stdout)

    def run(self, job_dir: pathlib.Path):
        """``fledgectl run DIR``: (job id, exit code, output)."""
        res = self.fledgectl("run", str(job_dir), timeout=JOB_TIMEOUT)
        output = res.stdout + res.stderr
        found = re.search(r"^created job (\S+)", output, re.MULTILINE)
        assert found, f"no job id in fledgectl output:\n{output}\nstandalone:\n{self.log()}"
        return found.group(1), res.returncode, output


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    bins = bin_dir()
    missing = [b for b in ("fledge", "fledgectl") if not (bins / b).is_file()]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not built in {bins} (cargo build -p fledge -p fledge-cli, "
            "or set FLEDGE_BIN_DIR)"
        )
    platform = Platform(tmp_path_factory.mktemp("platform"))
    yield platform
    platform.stop()


def test_numpy_mnist_job_completes_through_the_platform(platform):
    job, code, output = platform.run(EXAMPLE_DIR)
    assert code == 0, output
    assert platform.json("get", "job", job)["state"] == "completed"

    tasks = platform.json("get", "tasks", job)
    assert sorted(t["role"] for t in tasks) == ["aggregator"] + ["trainer"] * 4
    assert all(t["state"] == "completed" for t in tasks), [(t["role"], t["state"]) for t in tasks]
    for task in (t for t in tasks if t["role"] == "trainer"):
        # The worker ran the bundle's main.py with the Python of FLEDGE_PYTHON.
        assert f"running {sys.executable} main.py" in task["log"], task["log"]
        # fledge.run's default progress line, one per round, in the task's log.
        assert "fledge: round 5" in task["log"], task["log"]

    records = platform.json("get", "metrics", job)
    rounds = sorted((r for r in records if r["role"] == "aggregator"), key=lambda r: r["round"])
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5], rounds
    last = rounds[-1]["metrics"]
    assert last["updates"] == 4.0 and last["numSamples"] == 8000.0, last
    # The global model's test accuracy (2,000 held-out digits, the aggregator's evalDataset)
    # in the last round, and the trainers' locally trained models' mean beside it.
    accuracy = last["global.accuracy"]
    assert last["trainer.afterTraining.accuracy"] >= 0.8, last
    assert accuracy >= 0.85, rounds
    trainer_rounds = [r for r in records if r["role"] == "trainer" and r["round"] == 5]
    assert len(trainer_rounds) == 4, records
    print(f"mnist-numpy through the platform: accuracy {accuracy:.4f} after 5 rounds")

    # The trained model, downloaded through the same config fledgectl uses: the final model is
    # the global model after the last round.
    import numpy as np

    import fledge

    final = fledge.load_model(job, config=platform.cli_config)
    last_round = fledge.load_model(job, round=5, config=platform.cli_config)
    assert list(final) == list(last_round) and final, final.keys()
    for name, array in final.items():
        assert array.dtype == np.float32, (name, array.dtype)
        assert np.array_equal(array, last_round[name]), name
    with pytest.raises(fledge.FledgeError, match="no model for round 99"):
        fledge.load_model(job, round=99, config=platform.cli_config)
    with pytest.raises(fledge.ConfigError, match="non-negative"):
        fledge.load_model(job, round=-1, config=platform.cli_config)


BROKEN_TRAINER = '''
    import numpy as np

    import fledge


    class Broken(fledge.Trainer):
        def initialize(self):
            self.weights = {"w": np.zeros((2, 2), np.float32)}

        def train(self):
            raise RuntimeError(f"deliberate failure in round {self.round}")


    fledge.run(Broken)
'''


def test_exception_in_a_python_trainer_fails_the_job_with_its_traceback(platform, tmp_path):
    job_dir = tmp_path / "mnist-numpy-broken"
    shutil.copytree(EXAMPLE_DIR, job_dir)
    (job_dir / "code" / "trainer" / "main.py").write_text(textwrap.dedent(BROKEN_TRAINER))
    spec = json.loads((job_dir / "job.json").read_text())
    spec["designId"] = "mnist-numpy-broken"
    (job_dir / "job.json").write_text(json.dumps(spec))
    for spec_file in [*job_dir.glob("dataset-*.json"), job_dir / "modelSpec.json"]:
        # The copy left examples/: point its relative `file:../data` URLs (the datasets and the
        # aggregator's evalDataset) at the real data.
        text = spec_file.read_text().replace("file:../data", f"file://{REPO / 'examples' / 'data'}")
        spec_file.write_text(text)

    job, code, output = platform.run(job_dir)
    assert code != 0, output
    assert "ended failed" in output, output
    assert platform.json("get", "job", job)["state"] == "failed"

    trainers = [t for t in platform.json("get", "tasks", job) if t["role"] == "trainer"]
    assert len(trainers) == 4
    # The first trainer to raise exits (code 2) before its peers see it leave, so it ends
    # failed; the job's failure then stops the others, which may not have raised yet.
    states = sorted(t["state"] for t in trainers)
    assert set(states) <= {"failed", "terminated"} and "failed" in states, states
    failed = [t for t in trainers if t["state"] == "failed"]
    for task in failed:
        log = task["log"]
        assert "Traceback (most recent call last)" in log, log
        assert "in train" in log and "RuntimeError: deliberate failure in round 1" in log, log
        assert "exited with exit code 2" in log, log
    # The same tail through `fledgectl logs`.
    res = platform.fledgectl("logs", job, failed[0]["taskId"])
    assert res.returncode == 0, res.stderr
    assert "RuntimeError: deliberate failure in round 1" in res.stdout, res.stdout


def test_torch_mnist_job_completes_through_the_platform(platform):
    pytest.importorskip("torch", reason="torch is not installed (pip install torch)")
    job, code, output = platform.run(REPO / "examples" / "mnist-torch")
    assert code == 0, output
    assert platform.json("get", "job", job)["state"] == "completed"
    records = platform.json("get", "metrics", job)
    rounds = sorted((r for r in records if r["role"] == "aggregator"), key=lambda r: r["round"])
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5], rounds
    accuracy = rounds[-1]["metrics"]["trainer.afterTraining.accuracy"]
    assert accuracy >= 0.85, rounds
    print(f"mnist-torch through the platform: accuracy {accuracy:.4f} after 5 rounds")
