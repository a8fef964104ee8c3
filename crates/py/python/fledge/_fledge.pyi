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
    exit_on_user_error: bool = False,
    role: Optional[str] = None,
    feature_party: Optional[Callable[[], Any]] = None,
    label_party: Optional[Callable[[], Any]] = None,
    progress: Optional[Callable[[int, str, str, Dict[str, float]], None]] = None,
) -> Tuple[str, Optional[Dict[str, npt.NDArray[np.float32]]]]:
    """Runs one task with the GIL released; returns (summary JSON, final model or None).

    With ``exit_on_user_error``, an exception in user code writes its traceback to stderr
    and exits the process with code 2 at once, before the role leaves its channels.
    ``progress(round, task_id, role, metrics)`` sees each record the task reports; an
    exception it raises stops the run and propagates.
    """

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
    topology: str = "tree",
    feature_party: Optional[Callable[[], Any]] = None,
    label_party: Optional[Callable[[], Any]] = None,
    progress: Optional[Callable[[int, str, str, Dict[str, float]], None]] = None,
) -> Tuple[str, Optional[Dict[str, npt.NDArray[np.float32]]], str]:
    """Runs a whole job in-process; returns (top summary JSON, final model, others JSON).

    ``progress`` sees the top task's records, one per round of the job.
    """

def load_model(
    job_id: str,
    round: Optional[int] = None,
    group: Optional[str] = None,
    config: Optional[str] = None,
) -> Dict[str, npt.NDArray[np.float32]]:
    """Downloads one of a job's trained model files through the fledgectl config's apiserver."""

def roundtrip_weights(
    weights: Dict[str, npt.NDArray[np.float32]],
) -> Dict[str, npt.NDArray[np.float32]]:
    """Copies weights into Rust and moves them back out (no copy on the way out)."""

class ChannelError(FledgeError):
    """A channel operation failed (the peer left, the broker is unreachable, ...)."""

class Message:
    """A message received from a channel."""

    kind: str
    """``weights``, ``update``, ``control``, ``end_of_training``, ``ack`` or ``metrics``."""
    round: int
    model_version: int
    sender: str
    """The sending end's task id."""
    meta: Dict[str, Any]
    tensors: Dict[str, npt.NDArray[Any]]
    """float32 arrays (int64/uint8 tensors keep their dtype)."""

class Channel:
    """One channel as seen from this task's end."""

    @property
    def name(self) -> str: ...
    @property
    def group(self) -> str: ...
    @property
    def me(self) -> str: ...
    @property
    def peer_role(self) -> str: ...
    def ends(self) -> List[str]:
        """Live peer ends, sorted."""
    def await_ends(self, n: int = 1, timeout: float = 30.0) -> List[str]:
        """Waits until at least ``n`` peers are present; returns them."""
    def send(
        self,
        end: str,
        tensors: Optional[Dict[str, npt.NDArray[np.float32]]] = None,
        meta: Optional[Dict[str, Any]] = None,
        kind: str = "weights",
        round: int = 0,
    ) -> None:
        """Sends a message to the peer ``end``."""
    def broadcast(
        self,
        tensors: Optional[Dict[str, npt.NDArray[np.float32]]] = None,
        meta: Optional[Dict[str, Any]] = None,
        kind: str = "weights",
        round: int = 0,
    ) -> List[str]:
        """Sends a message to every current peer; returns their ids."""
    def recv(self, end: str, timeout: Optional[float] = None) -> Message:
        """The next message from ``end``; ``TimeoutError`` after ``timeout`` seconds."""
    def recv_any(self, timeout: Optional[float] = None) -> Tuple[str, Message]:
        """The oldest message from any peer as ``(end, message)``."""

class ChannelSet:
    """The channels of one task."""

    @property
    def role(self) -> str: ...
    def names(self) -> List[str]: ...
    def get(self, name: str) -> Channel: ...
    def by_tag(self, tag: str) -> Channel:
        """The channel whose function tags for this role include ``tag``."""
    def close(self) -> None:
        """Leaves every channel cleanly and disconnects."""

def join_channels(config_json: str) -> ChannelSet:
    """Joins every channel of the task config (JSON text)."""
