"""Direct channel access over the in-process backend: two ends of one channel in this process."""

import json
import uuid

import numpy as np
import pytest

import fledge

from conftest import task_config


def pair():
    """An aggregator and a trainer end of param-channel in a job of their own."""
    job = {"id": f"job-{uuid.uuid4().hex[:8]}", "name": "channels"}
    agg = fledge.join_channels(json.dumps(task_config(taskId="agg-0", role="aggregator", job=job, dataset=None)))
    trainer_config = fledge.Config.from_json(json.dumps(task_config(taskId="trainer-0", job=job)))
    trainer = fledge.join_channels(trainer_config)
    return agg, trainer


def test_send_recv_broadcast_between_two_ends():
    agg_set, trainer_set = pair()
    try:
        assert agg_set.role == "aggregator" and agg_set.names() == ["param-channel"]
        agg = agg_set.by_tag("distribute")
        trainer = trainer_set.by_tag("fetch")
        assert trainer.me == "trainer-0" and trainer.peer_role == "aggregator" and trainer.group == "default"
        assert agg.await_ends(1, timeout=10) == ["trainer-0"]
        assert trainer.ends() == ["agg-0"]

        w = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(2.5, np.float32)}
        trainer.send("agg-0", tensors=w, meta={"num_samples": 7, "note": [1, "x"]}, kind="update", round=3)
        msg = agg.recv("trainer-0", timeout=10)
        assert (msg.kind, msg.round, msg.sender) == ("update", 3, "trainer-0")
        assert msg.meta == {"num_samples": 7, "note": [1, "x"]}
        assert list(msg.tensors) == ["w", "s"]
        np.testing.assert_array_equal(msg.tensors["w"], w["w"])
        assert msg.tensors["s"].shape == () and msg.tensors["s"].dtype == np.float32

        assert agg.broadcast(meta={"command": "stop"}, kind="control") == ["trainer-0"]
        end, msg = trainer.recv_any(timeout=10)
        assert end == "agg-0" and msg.kind == "control" and msg.meta == {"command": "stop"}
        assert msg.tensors == {}
    finally:
        agg_set.close()
        trainer_set.close()


def test_channel_errors_are_python_exceptions():
    agg_set, trainer_set = pair()
    try:
        agg = agg_set.get("param-channel")
        with pytest.raises(TimeoutError, match="recv: no answer within 0.2 s"):
            agg.recv("trainer-0", timeout=0.2)
        with pytest.raises(fledge.ChannelError, match="nobody"):
            agg.recv("nobody", timeout=5)
        with pytest.raises(fledge.ChannelError, match="no channel 'x'|no channel \"x\""):
            agg_set.get("x")
        with pytest.raises(fledge.ConfigError, match="message kind \"gossip\""):
            agg.send("trainer-0", kind="gossip")
        with pytest.raises(fledge.WeightsError, match="tensor \"w\" must be a float32"):
            agg.send("trainer-0", tensors={"w": np.ones(2)})
        with pytest.raises(fledge.ConfigError, match="meta is not JSON-serialisable"):
            agg.send("trainer-0", meta={"x": object()})
    finally:
        agg_set.close()
        trainer_set.close()


def test_the_gil_is_released_while_rust_waits():
    import threading
    import time

    agg_set, trainer_set = pair()
    trainer = trainer_set.get("param-channel")

    def send_later():
        time.sleep(0.3)  # main is inside recv by then
        trainer.send("agg-0", meta={"from": "worker"})

    try:
        worker = threading.Thread(target=send_later)
        worker.start()
        # The worker's Python code can only run, and send what recv waits for, if recv
        # released the GIL; holding it would end in TimeoutError.
        msg = agg_set.get("param-channel").recv("trainer-0", timeout=30)
        assert msg.meta == {"from": "worker"}
        worker.join()
    finally:
        agg_set.close()
        trainer_set.close()
