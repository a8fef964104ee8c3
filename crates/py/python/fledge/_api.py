"""The user-facing API: trainer and evaluator base classes, ``run`` and ``simulate``."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np

from . import _fledge
from ._fledge import ConfigError, TaskError, WeightsError

Weights = Dict[str, np.ndarray]
"""A model: tensor name -> float32 array, in a fixed order (the dict's)."""

Metrics = Dict[str, float]


@dataclass(frozen=True)
class RoundProgress:
    """One finished round, as :func:`simulate` and :func:`run` report it to ``progress``.

    ``metrics`` is the round's record as the task reported it: for an aggregator the global
    model's evaluation (``global.accuracy``, ``global.loss``: what the evaluator measured),
    the trainers' weighted means (``trainer.train_loss``, ``trainer.afterTraining.accuracy``),
    ``roundSeconds``, participants (``updates``, ``trainersDropped``) and bytes per channel
    (``channel.<name>.bytesSent``); for a trainer its own ``train_*`` and ``afterTraining.*``.
    """

    round: int
    """The round just finished (1-based)."""
    rounds: Optional[int]
    """The rounds the job asks for (``hyperparameters["rounds"]``), when it says."""
    task_id: str
    role: str
    metrics: Metrics
    elapsed: float
    """Seconds since the run started."""


ProgressCallback = Callable[[RoundProgress], None]

# Shown in the progress line, when the record has them: the global model's evaluation, the
# trainers' means (an aggregator's record), a trainer's own figures (a trainer's record).
_PROGRESS_KEYS = (
    "global.accuracy",
    "global.loss",
    "trainer.afterTraining.accuracy",
    "trainer.train_loss",
    "afterTraining.accuracy",
    "train_loss",
)


def print_progress(p: RoundProgress) -> None:
    """The default progress line, on stderr: ``fledge: round 3/10  global.accuracy 0.9120 ...``."""
    total = f"/{p.rounds}" if p.rounds else ""
    parts = [f"round {p.round}{total}"]
    for key in _PROGRESS_KEYS:
        if key in p.metrics:
            parts.append(f"{key} {p.metrics[key]:.4f}")
    if "roundSeconds" in p.metrics:
        parts.append(f"({p.metrics['roundSeconds']:.2f} s)")
    print("fledge: " + "  ".join(parts), file=sys.stderr, flush=True)


def _progress(
    progress: Union[bool, ProgressCallback, None], rounds: Optional[int]
) -> Optional[Callable[[int, str, str, Metrics], None]]:
    """The callable the native run calls per record: ``progress`` wrapped, or ``None``."""
    if progress is None or progress is False:
        return None
    if progress is True:
        callback: ProgressCallback = print_progress
    elif callable(progress):
        callback = progress
    else:
        raise ConfigError(f"progress must be True, False or a callable, not {progress!r}")
    started = time.monotonic()

    def report(round: int, task_id: str, role: str, metrics: Metrics) -> None:
        callback(
            RoundProgress(round, rounds, task_id, role, dict(metrics), time.monotonic() - started)
        )

    return report


def _rounds(hyperparameters: Mapping[str, Any]) -> Optional[int]:
    rounds = hyperparameters.get("rounds")
    return rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else None


@dataclass(frozen=True)
class Config:
    """What a task knows about itself: identity, hyperparameters and its dataset.

    ``raw`` is the whole task config (Flame's field names, camelCase).
    """

    task_id: str
    job_id: str
    job_name: str
    role: str
    task_index: int
    hyperparameters: Dict[str, Any]
    dataset_url: Optional[str]
    dataset: Optional[Dict[str, Any]]
    raw: Dict[str, Any] = field(repr=False)

    def get(self, name: str, default: Any = None) -> Any:
        """The hyperparameter ``name``, or ``default`` when the job does not set it."""
        return self.hyperparameters.get(name, default)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        """Parses and validates a task config (JSON text); raises ``ConfigError``."""
        raw = json.loads(_fledge.parse_config(text))
        dataset = raw.get("dataset")
        job = raw.get("job") or {}
        return cls(
            task_id=raw["taskId"],
            job_id=job.get("id", ""),
            job_name=job.get("name", ""),
            role=raw.get("role", ""),
            task_index=int(raw.get("taskIndex", 0)),
            hyperparameters=dict(raw.get("hyperparameters") or {}),
            dataset_url=dataset.get("url") if dataset else None,
            dataset=dataset,
            raw=raw,
        )

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "Config":
        """Reads and validates the task config at ``path``."""
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())


def parse_config(path_or_json: Union[str, os.PathLike]) -> Config:
    """A :class:`Config` from a task config file path or its JSON text."""
    text = str(path_or_json)
    if text.lstrip().startswith("{"):
        return Config.from_json(text)
    return Config.from_file(path_or_json)


def join_channels(config: Union[Config, str, os.PathLike]) -> "_fledge.ChannelSet":
    """Joins every channel of a task config (a :class:`Config`, a path or JSON text).

    For custom roles that exchange messages themselves instead of using :class:`Trainer`::

        channels = fledge.join_channels(sys.argv[1])
        ch = channels.by_tag("fetch")
        [aggregator] = ch.await_ends(1, timeout=60)
        ch.send(aggregator, tensors={"w": w}, meta={"num_samples": 10}, kind="update", round=1)
        msg = ch.recv(aggregator, timeout=60)     # msg.tensors, msg.meta, msg.kind, msg.round
        channels.close()
    """
    if isinstance(config, Config):
        text = json.dumps(config.raw)
    else:
        text = str(config)
        if not text.lstrip().startswith("{"):
            with open(config, encoding="utf-8") as f:
                text = f.read()
    return _fledge.join_channels(text)


def _is_torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.Tensor`` (or a subclass), without importing torch."""
    module = type(value).__module__ or ""
    return (module == "torch" or module.startswith("torch.")) and hasattr(value, "numpy")


def _torch_to_numpy(value: Any) -> np.ndarray:
    """A CPU view of a torch tensor as a numpy array sharing its memory (no copy).

    Dtypes numpy lacks (bfloat16, ...) are converted to float32 first.
    """
    tensor = value.detach().cpu().resolve_conj().resolve_neg()
    try:
        return tensor.numpy()
    except TypeError:  # e.g. "Got unsupported ScalarType BFloat16"
        return tensor.float().numpy()


def _to_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a C-contiguous float32 array (no copy when it already is one).

    A float32 CPU torch tensor becomes a numpy view of its memory, so it is not copied
    either: the only copy is the one into the Rust tensor.
    """
    if not isinstance(value, np.ndarray) and _is_torch_tensor(value):
        value = _torch_to_numpy(value)
    try:
        return np.asarray(value, dtype=np.float32, order="C")
    except (TypeError, ValueError) as e:
        raise WeightsError(f"weight {name!r} cannot become a float32 array: {e}") from e


def to_weights(weights: Mapping[str, Any]) -> Weights:
    """Normalises a model to ``dict[str, float32 C-contiguous ndarray]``.

    Accepts numpy arrays of any dtype and layout, nested lists and PyTorch tensors (a
    ``state_dict()``); arrays that already fit are passed through without a copy, and so
    are float32 contiguous CPU tensors (as numpy views of their memory).
    """
    if not isinstance(weights, Mapping):
        raise WeightsError(
            f"weights must be a dict of name -> array, not {type(weights).__name__}"
        )
    res: Weights = {}
    for name, value in weights.items():
        if not isinstance(name, str):
            raise WeightsError(f"weight names must be str, not {type(name).__name__}")
        res[name] = _to_array(name, value)
    return res


def _to_metrics(value: Any, what: str) -> Metrics:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must return a dict of metric name -> number, not {type(value).__name__}")
    res = {}
    for k, v in value.items():
        try:
            res[str(k)] = float(v)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{what}: metric {k!r} must be a number, not {type(v).__name__}") from e
    return res


class Trainer:
    """Base class of user trainers.

    The trainer role calls, in order: :meth:`initialize` and :meth:`load_data` once; then
    each round :meth:`set_weights` (the global model), :meth:`train`, :meth:`evaluate` and
    :meth:`get_weights` (the update it uploads). By default the model is ``self.weights``,
    a ``dict[str, numpy.ndarray]`` of float32 arrays; override :meth:`get_weights` and
    :meth:`set_weights` when it lives elsewhere (e.g. a PyTorch module's ``state_dict``).

    Attributes available to subclasses: ``self.config`` (a :class:`Config`, set before
    :meth:`initialize`), ``self.round`` (1-based, set before :meth:`train`) and
    ``self.weights``. Create the model in :meth:`initialize`, not ``__init__``: the class
    is instantiated with no arguments.
    """

    config: Config
    weights: Weights
    round: int = 0

    # -- user hooks -------------------------------------------------------------------

    def initialize(self) -> None:
        """Reads hyperparameters (``self.config``) and builds the model."""

    def load_data(self) -> None:
        """Loads this task's data, e.g. from ``self.config.dataset_url``."""

    def train(self) -> Union[int, Tuple[int, Mapping[str, float]]]:
        """Trains locally for round ``self.round`` from the current weights.

        Returns the number of samples trained on (the FedAvg weight), or
        ``(num_samples, metrics)``; metrics are reported with a ``train_`` prefix.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement train()")

    def evaluate(self) -> Mapping[str, float]:
        """Evaluates the current weights, e.g. ``{"loss": ..., "accuracy": ...}``.

        A trainer calls it twice a round: on the model it received, before ``train`` (reported
        as ``beforeTraining.<name>``), and on its trained model (``afterTraining.<name>``).
        """
        return {}

    def get_weights(self) -> Mapping[str, Any]:
        """The current model (default: ``self.weights``)."""
        return self.weights

    def set_weights(self, weights: Weights) -> None:
        """Replaces the model with ``weights`` (default: ``self.weights = weights``).

        The arrays are fresh, writable and owned by this trainer.
        """
        self.weights = weights

    def update_metrics(self, metrics: Mapping[str, float]) -> None:
        """Adds metrics to this round's report (sent with the round's update)."""
        pending = self.__dict__.setdefault("_fledge_metrics", {})
        pending.update(_to_metrics(metrics, "update_metrics()"))

    # -- protocol called by the Rust trainer role ---------------------------------------

    def _fledge_initialize(self, config_json: str) -> None:
        self.config = Config.from_json(config_json)
        if "weights" not in self.__dict__:
            self.weights = {}
        self.initialize()

    def _fledge_load_data(self) -> None:
        self.load_data()

    def _fledge_train(self, round: int) -> Tuple[int, Metrics]:
        self.round = round
        res = self.train()
        if isinstance(res, tuple):
            if len(res) != 2:
                raise TypeError("train() must return num_samples or (num_samples, metrics)")
            num_samples, metrics = res
        else:
            num_samples, metrics = res, None
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0:
            raise TypeError(
                f"train() must return a non-negative int number of samples, not {num_samples!r}"
            )
        out = self.__dict__.pop("_fledge_metrics", {})
        out.update(_to_metrics(metrics, "train()"))
        return int(num_samples), out

    def _fledge_evaluate(self) -> Metrics:
        return _to_metrics(self.evaluate(), "evaluate()")

    def _fledge_get_weights(self) -> Weights:
        return to_weights(self.get_weights())

    def _fledge_set_weights(self, weights: Weights) -> None:
        self.set_weights(weights)


class Evaluator:
    """Base class of server-side evaluation for the built-in aggregators.

    After each round the aggregator calls :meth:`evaluate` with the new global model; the
    metrics go into the round's record (e.g. ``accuracy`` on a held-out test set).
    """

    config: Config

    def initialize(self) -> None:
        """Reads hyperparameters (``self.config``) and loads evaluation data."""

    def evaluate(self, weights: Weights) -> Mapping[str, float]:
        """Metrics of the global model ``weights``."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate()")

    def _fledge_initialize(self, config_json: str) -> None:
        self.config = Config.from_json(config_json)
        self.initialize()

    def _fledge_evaluate(self, weights: Weights) -> Metrics:
        return _to_metrics(self.evaluate(weights), "Evaluator.evaluate()")


def _embedding(value: Any, rows: int, what: str) -> np.ndarray:
    """``value`` as a C-contiguous float32 ``[rows, dim]`` array."""
    try:
        array = np.asarray(value, dtype=np.float32, order="C")
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be a float32 array of shape [rows, dim]: {e}") from e
    if array.ndim != 2 or array.shape[0] != rows:
        raise TypeError(f"{what} must have shape [{rows}, dim], not {list(array.shape)}")
    return np.ascontiguousarray(array)


class FeatureParty:
    """Base class of a feature party of vertical (split) learning, role
    ``vertical-feature-party``.

    The party holds some columns of the shared samples and a *bottom model*; only
    embeddings and their gradients leave it. The role calls :meth:`load` once, then
    :meth:`align` with the aligned sample ids, then for each training batch :meth:`embed`
    (``split="train"``) followed by :meth:`backward`, and :meth:`embed` (``split="test"``) to
    evaluate. ``rows`` index the aligned lists (train, then test) as given to :meth:`align`.
    """

    config: Config

    def load(self) -> Sequence[str]:
        """Loads this party's table (``self.config.dataset_url``); returns its sample ids."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def embedding_dim(self) -> int:
        """Values per embedding row."""
        raise NotImplementedError(f"{type(self).__name__} must implement embedding_dim()")

    def align(self, train: List[str], test: List[str]) -> None:
        """Keeps the rows of ``train`` then ``test`` (ids of its table), in that order."""
        raise NotImplementedError(f"{type(self).__name__} must implement align()")

    def embed(self, split: str, rows: List[int]) -> Any:
        """Embeddings (``[len(rows), embedding_dim()]``) of aligned ``rows`` of ``split``."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed()")

    def backward(self, gradient: np.ndarray) -> None:
        """Steps the bottom model with the loss gradient for the last train embedding."""
        raise NotImplementedError(f"{type(self).__name__} must implement backward()")

    def get_weights(self) -> Mapping[str, Any]:
        """The bottom model's weights."""
        return {}

    # -- protocol called by the Rust feature party role ------------------------------------

    def _fledge_load(self, config_json: str) -> List[str]:
        self.config = Config.from_json(config_json)
        return [str(i) for i in self.load()]

    def _fledge_embedding_dim(self) -> int:
        dim = self.embedding_dim()
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise TypeError(f"embedding_dim() must return a positive int, not {dim!r}")
        return int(dim)

    def _fledge_align(self, train: List[str], test: List[str]) -> None:
        self.align(train, test)

    def _fledge_embed(self, split: str, rows: List[int]) -> np.ndarray:
        return _embedding(self.embed(split, rows), len(rows), "embed()")

    def _fledge_backward(self, gradient: np.ndarray) -> None:
        self.backward(gradient)

    def _fledge_get_weights(self) -> Weights:
        return to_weights(self.get_weights())


class LabelParty:
    """Base class of the label party of vertical (split) learning, role
    ``vertical-label-party``.

    The party holds the labels (and maybe columns of its own) and the *top model*. The role
    calls :meth:`load` once, :meth:`align` with the aligned ids and the embedding width of
    each feature party, then :meth:`train_step` per batch and :meth:`evaluate` per round,
    with the feature parties' embeddings of ``rows`` in party order.
    """

    config: Config

    def load(self) -> Sequence[str]:
        """Loads the labelled table (``self.config.dataset_url``); returns its sample ids."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def align(self, train: List[str], test: List[str], dims: List[int]) -> None:
        """Keeps the rows of ``train`` then ``test``; builds the top model over embeddings
        of ``dims`` values (one entry per feature party)."""
        raise NotImplementedError(f"{type(self).__name__} must implement align()")

    def train_step(self, rows: List[int], embeddings: List[np.ndarray]) -> Tuple[float, List[Any]]:
        """One step on train ``rows``: returns the batch's mean loss and the loss gradient for
        each party's embedding (same shapes, same order)."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_step()")

    def evaluate(self, rows: List[int], embeddings: List[np.ndarray]) -> Mapping[str, float]:
        """Metrics (``loss``, ``accuracy``, ...) on test ``rows``."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate()")

    def get_weights(self) -> Mapping[str, Any]:
        """The top model's weights (the job's final model)."""
        return {}

    # -- protocol called by the Rust label party role --------------------------------------

    def _fledge_load(self, config_json: str) -> List[str]:
        self.config = Config.from_json(config_json)
        return [str(i) for i in self.load()]

    def _fledge_align(self, train: List[str], test: List[str], dims: List[int]) -> None:
        self.align(train, test, dims)

    def _fledge_train_step(
        self, rows: List[int], embeddings: List[np.ndarray]
    ) -> Tuple[float, List[np.ndarray]]:
        res = self.train_step(rows, embeddings)
        if not isinstance(res, tuple) or len(res) != 2:
            raise TypeError("train_step() must return (loss, gradients)")
        loss, gradients = res
        gradients = list(gradients)
        if len(gradients) != len(embeddings):
            raise TypeError(
                f"train_step() must return one gradient per party ({len(embeddings)}), not {len(gradients)}"
            )
        out = [
            _embedding(g, len(rows), f"train_step() gradient {i}") for i, g in enumerate(gradients)
        ]
        return float(loss), out

    def _fledge_evaluate(self, rows: List[int], embeddings: List[np.ndarray]) -> Metrics:
        return _to_metrics(self.evaluate(rows, embeddings), "LabelParty.evaluate()")

    def _fledge_get_weights(self) -> Weights:
        return to_weights(self.get_weights())


def load_model(
    job_id: str,
    round: Optional[int] = None,
    group: Optional[str] = None,
    config: Optional[Union[str, os.PathLike]] = None,
) -> Weights:
    """A trained model of a job, downloaded from the platform as ``{name: numpy array}``.

    ``round`` picks the global model after that round (default: the final model); ``group``
    the model of those groups for jobs that train one per group (``fledgectl get models JOB``
    lists them). The apiserver and token come from the fledgectl config (``config``, else
    ``$FLEDGE_CONFIG``, else ``~/.fledge/config.yaml``; ``$FLEDGE_ENDPOINT`` and
    ``$FLEDGE_TOKEN`` override it), as for ``fledgectl get model``. PyTorch users get a
    ``state_dict`` with ``fledge.pytorch.to_tensors(load_model(job_id))``.
    """
    if round is not None and (isinstance(round, bool) or not isinstance(round, int) or round < 0):
        raise ConfigError(f"round must be a non-negative integer, not {round!r}")
    path = os.fspath(config) if config is not None else None
    return _fledge.load_model(job_id, round, group, path)


def builtin_roles() -> List[str]:
    """The names of the built-in roles, as ``fledge roles`` lists them: what
    ``run(role=...)``, ``fledge run-task --role-kind`` and ``builtin = "..."`` accept."""
    return list(_fledge.builtin_roles())


@dataclass
class RunSummary:
    """What one task did: its role program, rounds and per-round metric records."""

    kind: str
    rounds: int
    history: List[Dict[str, Any]]
    final_model: Optional[Weights] = None

    def metric(self, name: str) -> List[float]:
        """The values of metric ``name`` over the rounds that reported it."""
        return [r["metrics"][name] for r in self.history if name in r.get("metrics", {})]

    @classmethod
    def _from_json(cls, text_or_obj: Any, final_model: Optional[Weights] = None) -> "RunSummary":
        obj = json.loads(text_or_obj) if isinstance(text_or_obj, str) else text_or_obj
        return cls(obj["kind"], obj["rounds"], obj["history"], final_model)


@dataclass
class SimReport:
    """Result of :func:`simulate`."""

    top: RunSummary
    """The top aggregator's run; ``top.final_model`` is the trained global model."""
    tasks: Dict[str, RunSummary]
    """Every other task that succeeded, by task id."""
    failures: Dict[str, str]
    """Every other task that failed, by task id: its error chain."""
    workdir: str
    """Where the registry (checkpoints, metrics) was written."""

    @property
    def final_model(self) -> Optional[Weights]:
        """The trained global model."""
        return self.top.final_model


def _factory(obj: Any, base: type, what: str, single: bool) -> Any:
    if obj is None:
        return None
    if isinstance(obj, base):
        if not single:
            raise ConfigError(f"{what} must be a class (one instance is made per task), not an instance")
        return lambda: obj
    if not callable(obj):
        raise ConfigError(f"{what} must be a {base.__name__} subclass, not {type(obj).__name__}")
    return obj


def run(
    trainer: Optional[Union[Type[Trainer], Trainer]] = None,
    evaluator: Optional[Union[Type[Evaluator], Evaluator]] = None,
    *,
    role: Optional[str] = None,
    feature_party: Optional[Union[Type[FeatureParty], FeatureParty]] = None,
    label_party: Optional[Union[Type[LabelParty], LabelParty]] = None,
    config_path: Optional[Union[str, os.PathLike]] = None,
    exit_on_error: bool = True,
    progress: Union[bool, ProgressCallback] = True,
) -> RunSummary:
    """Runs this process's task: the entry point of a role folder's ``main.py``.

    The task config path is ``config_path`` or ``sys.argv[1]`` (the agent runs
    ``python3 main.py config.json``); the task key comes from ``FLEDGE_TASK_KEY``. The role
    is ``role`` (any name of :func:`builtin_roles`), else the config's role name when it is a
    built-in one, else what the config's channels say (a trainer or an aggregator). Each role
    runs the user code it takes: ``trainer`` (trainers, ring and hybrid members), ``evaluator``
    (optional, aggregators), ``feature_party`` or ``label_party`` (vertical learning).

    The GIL is released while Rust waits on the network or aggregates. On failure the
    error (with the traceback of user code) goes to stderr and the process exits with code
    2 (64 for a bad config or usage), unless ``exit_on_error`` is false, in which case the
    ``TaskError``/``ConfigError`` propagates.

    An exception in user code ends the process right away (exit code 2, traceback on
    stderr), before the task leaves its channels: the agent sees the exit before its peers
    see it leave, so the task ends ``failed`` instead of being stopped as a consequence of
    its own departure.

    ``progress`` sees each round this task finishes (a :class:`RoundProgress`): ``True``
    prints :func:`print_progress`'s line to stderr (the task's log, ``fledgectl logs``), a
    callable gets the record instead, ``False`` is silent. An exception it raises stops the
    task and propagates.

    Rust's logs go through :mod:`logging` (loggers ``fledge_sdk.*``, ``fledge_channel.*``,
    ...). Unless the program configured logging before, ``run`` shows ``INFO`` and above on
    stderr, the task's log.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        if config_path is None:
            if len(sys.argv) < 2:
                raise ConfigError(f"usage: {sys.argv[0] if sys.argv else 'main.py'} CONFIG.json")
            config_path = sys.argv[1]
        try:
            with open(config_path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read task config {config_path}: {e}") from e
        hyper = json.loads(_fledge.parse_config(text)).get("hyperparameters") or {}
        summary, model = _fledge.run_task(
            text,
            _factory(trainer, Trainer, "trainer", True),
            _factory(evaluator, Evaluator, "evaluator", True),
            exit_on_user_error=exit_on_error,
            role=role,
            feature_party=_factory(feature_party, FeatureParty, "feature_party", True),
            label_party=_factory(label_party, LabelParty, "label_party", True),
            progress=_progress(progress, _rounds(hyper) if isinstance(hyper, dict) else None),
        )
    except ConfigError as e:
        if not exit_on_error:
            raise
        print(f"fledge: {e}", file=sys.stderr, flush=True)
        sys.exit(64)
    except TaskError as e:
        if not exit_on_error:
            raise
        print(f"fledge: task failed: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    return RunSummary._from_json(summary, model)


def _sort(name: str, kwargs: Optional[Mapping[str, Any]]) -> str:
    return json.dumps({"sort": name, "kwargs": dict(kwargs or {})})


def simulate(
    trainer: Optional[Type[Trainer]],
    datasets: Sequence[str],
    *,
    topology: str = "tree",
    feature_party: Optional[Type[FeatureParty]] = None,
    label_party: Optional[Type[LabelParty]] = None,
    rounds: Optional[int] = None,
    hyperparameters: Optional[Mapping[str, Any]] = None,
    middle: int = 0,
    optimizer: str = "fedavg",
    optimizer_kwargs: Optional[Mapping[str, Any]] = None,
    selector: str = "default",
    selector_kwargs: Optional[Mapping[str, Any]] = None,
    evaluator: Optional[Type[Evaluator]] = None,
    workdir: Optional[Union[str, os.PathLike]] = None,
    job_id: str = "sim",
    timeout: Optional[float] = None,
    progress: Union[bool, ProgressCallback] = True,
) -> SimReport:
    """Runs a whole job in this process, without a control plane.

    ``topology`` is the job's shape, all over the in-process channel backend:

    - ``"tree"``: one trainer task per entry of ``datasets`` (each a dataset URL, given to
      the trainer as ``self.config.dataset_url``), the built-in top aggregator and, with
      ``middle`` > 0, that many middle aggregators (a three-tier job);
    - ``"ring"``: one ``ring-trainer`` per dataset, averaging by ring all-reduce without an
      aggregator (``top`` is the ring leader's run, its model the final one);
    - ``"vertical"``: split learning; the first dataset is the ``label_party``'s table, each
      other one a ``feature_party``'s (``top`` is the label party's run).

    ``rounds`` is a shortcut for ``hyperparameters["rounds"]``. The registry goes to
    ``workdir`` (a new temporary directory by default). ``timeout`` (seconds) bounds the run.

    ``progress`` sees each round of the job as the top task (the top aggregator, the ring
    leader, the label party) finishes it, as a :class:`RoundProgress`: ``True`` prints
    :func:`print_progress`'s line to stderr, a callable gets it instead, ``False`` is silent.
    An exception the callable raises stops the simulation and propagates. Rust's logs go
    through :mod:`logging` (warnings and errors show by default).

    Raises ``TaskError`` when the job fails (the message includes every failed task's
    error, with the traceback of user code), ``ConfigError`` for bad arguments.
    """
    if isinstance(datasets, (str, bytes)):
        raise ConfigError("datasets must be a list of dataset URLs, not a single string")
    hyper = dict(hyperparameters or {})
    if rounds is not None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"rounds must be a positive int, not {rounds!r}")
        hyper["rounds"] = rounds
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="fledge-sim-")
    top, model, others = _fledge.simulate(
        _factory(trainer, Trainer, "trainer", False),
        [str(d) for d in datasets],
        json.dumps(hyper),
        middle,
        _sort(optimizer, optimizer_kwargs),
        _sort(selector, selector_kwargs),
        os.fspath(workdir),
        _factory(evaluator, Evaluator, "evaluator", False),
        job_id,
        float(timeout or 0.0),
        topology,
        _factory(feature_party, FeatureParty, "feature_party", False),
        _factory(label_party, LabelParty, "label_party", False),
        _progress(progress, _rounds(hyper)),
    )
    tasks: Dict[str, RunSummary] = {}
    failures: Dict[str, str] = {}
    for task_id, res in json.loads(others).items():
        if "ok" in res:
            tasks[task_id] = RunSummary._from_json(res["ok"])
        else:
            failures[task_id] = res["error"]
    return SimReport(RunSummary._from_json(top, model), tasks, failures, os.fspath(workdir))
