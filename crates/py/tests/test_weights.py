"""Weights crossing between Python and Rust: dtype, shape, order, and who owns the buffer."""

import re

import numpy as np
import pytest

import fledge
from fledge import _fledge
from fledge._api import to_weights


def sample():
    return {
        "fc1.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fc1.bias": np.array([0.5, -1.5, 2.25], dtype=np.float32),
        "scalar": np.array(3.0, dtype=np.float32),
        "cube": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32),
        "empty": np.zeros((0, 5), dtype=np.float32),
    }


def test_roundtrip_preserves_names_order_dtype_shape_and_values():
    w = sample()
    back = _fledge.roundtrip_weights(w)
    assert list(back) == list(w)
    for name, arr in w.items():
        assert back[name].dtype == np.float32, name
        assert back[name].shape == arr.shape, name
        np.testing.assert_array_equal(back[name], arr)


def test_arrays_from_rust_own_their_rust_buffer_without_a_copy():
    w = sample()
    back = _fledge.roundtrip_weights(w)
    for name, arr in back.items():
        # The array wraps the Rust Vec (its base is the Rust container), not a numpy copy.
        assert arr.base is not None and not isinstance(arr.base, np.ndarray), name
        assert type(arr.base).__name__ == "PySliceContainer", name
        assert not arr.flags.owndata, name
        assert arr.flags.c_contiguous and arr.flags.writeable, name
        assert not np.shares_memory(arr, w[name]), name  # Python -> Rust copied once
    back["fc1.weight"][0, 0] = 42.0  # writable in place
    assert back["fc1.weight"][0, 0] == 42.0


def test_to_weights_passes_float32_through_and_converts_the_rest():
    w = sample()
    same = to_weights(w)
    for name in w:
        assert same[name] is w[name], name  # no copy when the layout already fits
    odd = to_weights({
        "f64": np.ones((2, 2)),
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],
        "list": [[1, 2], [3, 4]],
        "fortran": np.asfortranarray(np.ones((3, 2), dtype=np.float32)),
    })
    for name, arr in odd.items():
        assert arr.dtype == np.float32 and arr.flags.c_contiguous, name
    np.testing.assert_array_equal(odd["strided"], np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2])
    back = _fledge.roundtrip_weights(odd)
    np.testing.assert_array_equal(back["list"], [[1, 2], [3, 4]])


def test_torch_state_dict_is_accepted():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(4, 2)
    w = to_weights(model.state_dict())
    assert list(w) == ["weight", "bias"] and w["weight"].shape == (2, 4)
    np.testing.assert_allclose(w["weight"], model.weight.detach().numpy())


@pytest.mark.parametrize(
    "weights, expected",
    [
        ({"w": np.ones(3, dtype=np.float64)}, "weight \"w\" must be a float32 numpy.ndarray, not float64[3]"),
        ({"w": np.ones((4, 4), dtype=np.float32)[:, ::2]}, "weight \"w\" is not C-contiguous"),
        ({3: np.ones(3, dtype=np.float32)}, "weight names must be str"),
        ([np.ones(3, dtype=np.float32)], "weights must be a dict"),
        ({"w": "text"}, "weight \"w\" must be a float32 numpy.ndarray, not str"),
    ],
)
def test_native_side_rejects_bad_weights_naming_the_tensor(weights, expected):
    with pytest.raises(fledge.WeightsError, match=re.escape(expected)):
        _fledge.roundtrip_weights(weights)


def test_to_weights_rejects_what_cannot_be_an_array():
    with pytest.raises(fledge.WeightsError, match="weight 'w' cannot become a float32 array"):
        to_weights({"w": [[1, 2], [3]]})
    with pytest.raises(fledge.WeightsError, match="weights must be a dict"):
        to_weights([1, 2])
