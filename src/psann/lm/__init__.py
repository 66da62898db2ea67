"""psann-lm: train, evaluate and use small language models.

    from psann.lm import psannLM, psannLMDataPrep

The model-facing API (and torch) is imported on first use, so light tools such as the tokenizers
(`psann.lm.tokenizers`) start fast.
"""

import importlib as _importlib
import logging as _logging
import os as _os

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


def _default_logging() -> None:
    # Progress and plan lines are part of the product; show them unless the user configured logging.
    # LOG_LEVEL=DEBUG (or WARNING, ...) sets the level, as the earlier LM_training scripts did.
    logger = _logging.getLogger("psann.lm")
    if not logger.handlers:
        handler = _logging.StreamHandler()
        handler.setFormatter(_logging.Formatter("psann: %(message)s"))
        logger.addHandler(handler)
        level = _os.environ.get("LOG_LEVEL", "INFO").upper()
        logger.setLevel(level if level in _logging.getLevelNamesMapping() else _logging.INFO)
        logger.propagate = False
        if level not in _logging.getLevelNamesMapping():
            logger.warning("LOG_LEVEL=%s is not a logging level (DEBUG, INFO, WARNING, ERROR); using INFO.", level)


_default_logging()

__all__ = [
    "psannLM", "psannLMDataPrep", "ModelConfig", "DataConfig", "TrainConfig", "GenerateConfig", "RunConfig",
    "load_config", "PsannError", "ConfigError", "DataError", "CheckpointError",
]
