"""Fledge federated learning for Python.

Write the code that touches data as a :class:`Trainer` subclass; Fledge's Rust data plane
does the rest (channels, aggregation, rounds, metrics, the registry)::

    import fledge

    class MyTrainer(fledge.Trainer):
        def initialize(self):
            self.weights = {"w": numpy.zeros((784, 10), numpy.float32)}
        def load_data(self):
            ...  # self.config.dataset_url
        def train(self):
            ...  # update self.weights in place or replace them
            return num_samples
        def evaluate(self):
            return {"accuracy": ...}

    if __name__ == "__main__":
        fledge.run(MyTrainer)          # as a task of a job: python3 main.py config.json

    # or, without a control plane:
    report = fledge.simulate(MyTrainer, datasets=[url0, url1, url2], rounds=5)

PyTorch models: subclass ``fledge.pytorch.TorchTrainer`` and set ``self.model``; its
``state_dict()`` tensors are the weights (``fledge.pytorch`` is the only module that imports
torch).
"""

from ._fledge import (
    Channel,
    ChannelError,
    ChannelSet,
    ConfigError,
    FledgeError,
    Message,
    TaskError,
    WeightsError,
    __version__,
)
from ._api import (
    Config,
    Evaluator,
    FeatureParty,
    LabelParty,
    builtin_roles,
    print_progress,
    RoundProgress,
    RunSummary,
    SimReport,
    Trainer,
    join_channels,
    load_model,
    parse_config,
    run,
    simulate,
)
from . import data

__all__ = [
    "Channel",
    "ChannelError",
    "ChannelSet",
    "Config",
    "ConfigError",
    "Evaluator",
    "FeatureParty",
    "FledgeError",
    "LabelParty",
    "Message",
    "RoundProgress",
    "RunSummary",
    "SimReport",
    "TaskError",
    "Trainer",
    "WeightsError",
    "__version__",
    "builtin_roles",
    "data",
    "join_channels",
    "load_model",
    "parse_config",
    "print_progress",
    "run",
    "simulate",
]
