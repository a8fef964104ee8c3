"""Type stubs of the native module ``fledge._fledge`` (use the ``fledge`` package instead)."""

from os import PathLike
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

class FledgeError(Exception):
    """Base class of Fledge's errors."""

class ConfigError(FledgeError):
    """A task config, job plan or argument is invalid (the message names what)."""

class TaskError(FledgeError):
    """A task failed: the Rust error chain, with the traceback of user code."""

class WeightsError(FledgeError):
    """Weights could not cross between Python and Rust (bad dtype, name or shape)."""

def parse_config(config_json: str) -> str:
    """Validates a task config (JSON text) and returns it normalised; raises ConfigError."""

def run_task(
    config_json: str,
    trainer: Optional[Callable[[], Any]] = None,
    evaluator: Optional[Callable[[], Any]] = None,
    workdir: Optional[Union[str, PathLike[str]]] = None,
) -> Tuple[str, Optional[Dict[str, npt.NDArray[np.float32]]]]:
    """Runs one task with the GIL released; returns (summary JSON, final model or None)."""

def simulate(
    trainer: Callable[[], Any],
    datasets: List[str],
    hyperparameters_json: str = "{}",
    middle: int = 0,
    optimizer_json: Optional[str] = None,
    selector_json: Optional[str] = None,
    workdir: Optional[Union[str, PathLike[str]]] = None,
    evaluator: Optional[Callable[[], Any]] = None,
    job_id: str = "sim",
    timeout: float = 0.0,
) -> Tuple[str, Optional[Dict[str, npt.NDArray[np.float32]]], str]:
    """Runs a whole job in-process; returns (top summary JSON, final model, others JSON)."""

def roundtrip_weights(
    weights: Dict[str, npt.NDArray[np.float32]],
) -> Dict[str, npt.NDArray[np.float32]]:
    """Copies weights into Rust and moves them back out (no copy on the way out)."""
