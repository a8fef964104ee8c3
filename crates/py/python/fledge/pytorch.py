"""PyTorch models on Fledge: the weights are a module's ``state_dict()`` tensors.

torch is an optional dependency of ``fledge``: only this module imports it. ::

    import torch
    import fledge
    from fledge.pytorch import TorchTrainer

    class MyTrainer(TorchTrainer):
        def initialize(self):
            torch.manual_seed(0)                # every trainer starts from the same model
            self.model = torch.nn.Linear(784, 10)

        def train(self):
            ...                                 # train self.model for round self.round
            return num_samples

    fledge.run(MyTrainer)

How the tensors cross, and what is copied:

- Rust → Python: the global model arrives as numpy arrays that wrap the Rust buffers (no
  copy); :func:`to_tensors` turns them into tensors that share that memory
  (``torch.from_numpy``, no copy).
  :meth:`TorchTrainer.set_weights` then copies them into the module's parameters (one copy,
  so an optimizer made in ``initialize`` keeps pointing at live parameters), or, with
  ``assign_weights = True``, makes the parameters *be* those tensors (no copy at all).
- Python → Rust: ``state_dict()`` tensors are read through numpy views of their memory
  (:func:`from_state_dict`, no copy for float32 CPU tensors) and copied once into the Rust
  tensors that go on the wire. Other dtypes are converted to float32 (and back to the
  module's dtype by ``set_weights``).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from ._api import Trainer, Weights, to_weights

__all__ = ["TorchTrainer", "from_state_dict", "to_tensors"]


def to_tensors(
    weights: Mapping[str, np.ndarray],
    like: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """Fledge weights as a ``state_dict``-like dict of CPU tensors, in the same order.

    Each tensor shares the memory of its numpy array (``torch.from_numpy``: no copy), so
    writing to one writes to the other. With ``like`` (a module's ``state_dict()``), a
    tensor whose reference has another dtype (``num_batches_tracked`` is int64, a model may
    be float64 or bfloat16) is converted to it, which copies that tensor only.
    """
    res: Dict[str, torch.Tensor] = {}
    for name, array in weights.items():
        tensor = torch.from_numpy(np.asarray(array))
        if like is not None and name in like and like[name].dtype != tensor.dtype:
            tensor = tensor.to(like[name].dtype)
        res[name] = tensor
    return res


def from_state_dict(state_dict: Mapping[str, Any]) -> Weights:
    """A ``state_dict()`` as Fledge weights (float32 numpy arrays, in the same order).

    A float32 contiguous CPU tensor becomes a view of its memory (no copy); other dtypes,
    layouts and devices are converted.
    """
    return to_weights(state_dict)


class TorchTrainer(Trainer):
    """A :class:`fledge.Trainer` whose model is the ``torch.nn.Module`` ``self.model``.

    Set ``self.model`` in :meth:`initialize`; the weights that cross are its
    ``state_dict()``. Implement :meth:`train` (and :meth:`evaluate`) as for any trainer,
    using ``self.model``.

    ``assign_weights`` (class attribute, default ``False``): when true, :meth:`set_weights`
    loads the global model with ``load_state_dict(..., assign=True)``, so the parameters
    become tensors over the received buffers instead of receiving a copy. The module's
    parameter objects then change every round: create the optimizer in :meth:`train`, not
    :meth:`initialize`. Only for a model on the CPU (the received tensors are CPU tensors).
    """

    model: torch.nn.Module
    assign_weights: bool = False

    def get_weights(self) -> Mapping[str, Any]:
        """The module's ``state_dict()`` (tensors; read without a copy where possible)."""
        return self.model.state_dict()

    def set_weights(self, weights: Weights) -> None:
        """Loads the global model into ``self.model`` (strict: every key must match)."""
        tensors = to_tensors(weights, like=self.model.state_dict())
        if self.assign_weights:
            self.model.load_state_dict(tensors, strict=True, assign=True)  # torch >= 2.1
        else:
            self.model.load_state_dict(tensors, strict=True)
