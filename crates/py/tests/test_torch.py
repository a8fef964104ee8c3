"""PyTorch support (``fledge.pytorch``): state_dict tensors in and out, what is copied, and
the PyTorch MNIST example run locally. Skipped where torch is not installed."""

import importlib.util
import json
import subprocess
import sys
import uuid

import numpy as np
import pytest

import fledge
from fledge import _fledge
from fledge._api import to_weights

from conftest import REPO, task_config

TORCH_EXAMPLE = REPO / "examples" / "mnist-torch" / "code" / "trainer" / "main.py"


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is not installed (pip install torch)")


@pytest.fixture(scope="module")
def pytorch(torch):
    import fledge.pytorch

    return fledge.pytorch


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_import_fledge_does_not_import_torch():
    code = "import sys, fledge; assert 'torch' not in sys.modules, 'fledge imported torch'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_state_dict_tensors_are_read_without_a_copy(torch, pytorch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = model.state_dict()
    weights = pytorch.from_state_dict(state)
    assert list(weights) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for name, tensor in state.items():
        array = weights[name]
        assert isinstance(array, np.ndarray) and array.dtype == np.float32, name
        assert array.shape == tuple(tensor.shape), name
        # A numpy view of the tensor's memory, not a copy.
        assert address(array) == tensor.data_ptr(), name
    # The native side takes tensors too (the one copy into Rust happens there).
    back = _fledge.roundtrip_weights(state)
    assert list(back) == list(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(back[name], tensor.detach().numpy())
        assert address(back[name]) != tensor.data_ptr(), name


def test_weights_from_rust_become_tensors_over_the_rust_buffers(torch, pytorch):
    weights = _fledge.roundtrip_weights({
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.0, 2.0], np.float32),
    })
    tensors = pytorch.to_tensors(weights)
    assert list(tensors) == ["w", "b"]
    for name, tensor in tensors.items():
        array = weights[name]
        assert type(array.base).__name__ == "PySliceContainer", name  # owned by Rust
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == array.shape, name
        assert tensor.data_ptr() == address(array), name  # torch.from_numpy: shared
    tensors["w"][0, 0] = 42.0
    assert weights["w"][0, 0] == 42.0


def test_other_dtypes_convert_to_float32_and_back(torch, pytorch):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    model.to(torch.float64)
    model[1].num_batches_tracked.fill_(7)
    state = model.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    weights = to_weights(state)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in weights.values())
    assert weights["1.num_batches_tracked"].shape == () and weights["1.num_batches_tracked"] == 7.0
    restored = pytorch.to_tensors(_fledge.roundtrip_weights(weights), like=state)
    assert restored["1.num_batches_tracked"].dtype == torch.int64
    assert restored["0.weight"].dtype == torch.float64
    torch.testing.assert_close(restored["0.weight"], state["0.weight"].float().double())
    bf16 = to_weights({"w": torch.ones(2, 2, dtype=torch.bfloat16, requires_grad=True)})
    assert bf16["w"].dtype == np.float32 and bf16["w"].sum() == 4.0
    transposed = to_weights({"t": torch.arange(6.0).reshape(2, 3).t()})
    assert transposed["t"].flags.c_contiguous
    np.testing.assert_array_equal(transposed["t"], np.arange(6.0).reshape(2, 3).T)


def test_torch_trainer_loads_the_global_model_by_copy_or_by_assignment(torch, pytorch):
    class Net(pytorch.TorchTrainer):
        def initialize(self):
            self.model = torch.nn.Linear(3, 2)

    config = json.dumps(task_config())
    trainer = Net()
    trainer._fledge_initialize(config)
    param = trainer.model.weight
    global_model = _fledge.roundtrip_weights({
        "weight": np.full((2, 3), 0.5, np.float32), "bias": np.array([1.0, -1.0], np.float32),
    })
    trainer._fledge_set_weights(global_model)
    # Copy mode: the same Parameter objects (an optimizer stays valid) hold the new values.
    assert trainer.model.weight is param
    assert trainer.model.weight.data_ptr() != address(global_model["weight"])
    torch.testing.assert_close(trainer.model.weight.detach(), torch.full((2, 3), 0.5))
    out = trainer._fledge_get_weights()
    assert address(out["weight"]) == trainer.model.weight.data_ptr()

    class Assigned(Net):
        assign_weights = True

    trainer = Assigned()
    trainer._fledge_initialize(config)
    trainer._fledge_set_weights(global_model)
    # Assign mode: the parameters are tensors over the buffers that came from Rust.
    assert trainer.model.weight.data_ptr() == address(global_model["weight"])
    assert trainer.model.weight.requires_grad
    torch.testing.assert_close(trainer.model.bias.detach(), torch.tensor([1.0, -1.0]))

    with pytest.raises(RuntimeError, match="Missing key"):
        trainer._fledge_set_weights({"weight": np.zeros((2, 3), np.float32)})


def test_channels_send_torch_tensors(torch):
    job = {"id": f"job-{uuid.uuid4().hex[:8]}", "name": "torch channels"}
    agg = fledge.join_channels(json.dumps(task_config(taskId="agg-0", role="aggregator", job=job, dataset=None)))
    trainer = fledge.join_channels(json.dumps(task_config(taskId="trainer-0", job=job)))
    try:
        ch = trainer.get("param-channel")
        assert agg.get("param-channel").await_ends(1, timeout=10) == ["trainer-0"]
        w = torch.nn.Linear(3, 2).state_dict()
        ch.send("agg-0", tensors=dict(w), kind="update", round=1)
        msg = agg.get("param-channel").recv("trainer-0", timeout=10)
        assert list(msg.tensors) == ["weight", "bias"]
        np.testing.assert_array_equal(msg.tensors["weight"], w["weight"].numpy())
        with pytest.raises(fledge.WeightsError, match='tensor "x" must be a float32'):
            ch.send("agg-0", tensors={"x": torch.ones(2, dtype=torch.float64)})
    finally:
        agg.close()
        trainer.close()


def test_three_torch_trainers_reach_085_locally(torch, pytorch, data_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("mnist_torch_example", TORCH_EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    urls = [f"file://{data_dir}?shard={i}&shards=3" for i in range(3)]
    report = fledge.simulate(
        example.MnistTorchTrainer,
        urls,
        rounds=2,
        hyperparameters={"model": "cnn", "learningRate": 0.1},
        workdir=tmp_path,
        timeout=300,
    )
    assert report.failures == {}
    assert sorted(report.tasks) == ["sim-trainer-0", "sim-trainer-1", "sim-trainer-2"]
    for summary in report.tasks.values():
        assert summary.rounds == 2 and len(summary.metric("train_loss")) == 2
    model = example.build_model("cnn", 0)
    model.load_state_dict(pytorch.to_tensors(report.final_model), strict=True)
    _, _, x_test, y_test = fledge.data.load_mnist(urls[0])
    accuracy = example.evaluate(model, torch.from_numpy(x_test), torch.from_numpy(y_test))["accuracy"]
    assert accuracy >= 0.85, accuracy
