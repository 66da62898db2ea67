"""psann-lm: train, evaluate and use small language models.

    from psann.lm import psannLM, psannLMDataPrep
"""

import logging as _logging

from .api import psannLM, psannLMDataPrep
from .config import DataConfig, GenerateConfig, ModelConfig, RunConfig, TrainConfig, load_config
from .errors import CheckpointError, ConfigError, DataError, PsannError


def _default_logging() -> None:
    # Progress and plan lines are part of the product; show them unless the user configured logging.
    logger = _logging.getLogger("psann.lm")
    if not logger.handlers:
        handler = _logging.StreamHandler()
        handler.setFormatter(_logging.Formatter("psann: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(_logging.INFO)
        logger.propagate = False


_default_logging()

__all__ = [
    "psannLM", "psannLMDataPrep", "ModelConfig", "DataConfig", "TrainConfig", "GenerateConfig", "RunConfig",
    "load_config", "PsannError", "ConfigError", "DataError", "CheckpointError",
]
