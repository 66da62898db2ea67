"""psann-lm: train, evaluate and use small language models.

    from psann.lm import psannLM, psannLMDataPrep

The model-facing API (and torch) is imported on first use, so light tools such as the tokenizers
(`psann.lm.tokenizers`) start fast.
"""

import importlib as _importlib
import logging as _logging

from .errors import CheckpointError, ConfigError, DataError, PsannError

_LAZY = {
    "psannLM": ".api", "psannLMDataPrep": ".api",
    "ModelConfig": ".config", "DataConfig": ".config", "TrainConfig": ".config", "GenerateConfig": ".config",
    "RunConfig": ".config", "load_config": ".config",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_logging.getLogger("psann.lm").addHandler(_logging.NullHandler())  # a library configures no output (console.py)

__all__ = [
    "psannLM", "psannLMDataPrep", "ModelConfig", "DataConfig", "TrainConfig", "GenerateConfig", "RunConfig",
    "load_config", "PsannError", "ConfigError", "DataError", "CheckpointError",
]
