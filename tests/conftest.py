from pathlib import Path

import pytest
import torch

from psann.lm.config import ModelConfig
from psann.lm.models import build_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file of ../shared/data, or skip: a user's clone has no ../shared."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{relative} (not present in this checkout)")
    return path


def tiny_config(**overrides) -> ModelConfig:
    values = dict(d_model=32, n_layers=2, n_heads=4, vocab_size=61, max_seq_len=64)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config()).eval()
