import json
from pathlib import Path

import pytest

from psann.lm.config import (ModelConfig, RunConfig, TrainConfig, apply_override, config_reference_markdown,
                             load_config)
from psann.lm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_toml_json_load_the_same(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  d_model: 64\ntrain:\n  lr: 3e-4\n  betas: [0.9, 0.99]\n")
    (tmp_path / "c.toml").write_text("[model]\nd_model = 64\n[train]\nlr = 3e-4\nbetas = [0.9, 0.99]\n")
    (tmp_path / "c.json").write_text(json.dumps({"model": {"d_model": 64}, "train": {"lr": 3e-4, "betas": [0.9, 0.99]}}))
    configs = [load_config(tmp_path / f"c.{ext}") for ext in ("yaml", "toml", "json")]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].train.lr == 3e-4 and configs[0].train.betas == (0.9, 0.99)  # YAML's "3e-4" string coerced


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(None, ["--train.lr=1e-3", "--model.n_layers=3", "--model.rope=false", "--train.max_steps=none",
                             "--data.train_files=[a.txt,b.txt]", "--model.sine_params.amp_init=2.0",
                             "--generate.top_k=5", "--train.batch_tokens=65_536"])
    assert cfg.train.lr == 1e-3 and cfg.model.n_layers == 3 and cfg.model.rope is False
    assert cfg.train.max_steps is None and cfg.data.train_files == ["a.txt", "b.txt"]
    assert cfg.model.sine_params == {"amp_init": 2.0} and cfg.generate.top_k == 5 and cfg.train.batch_tokens == 65536


@pytest.mark.parametrize("override,message", [
    ("--train.lrr=1", "Did you mean 'lr'"),
    ("--trian.lr=1", "Did you mean 'train'"),
    ("--train.lr=fast", "'train.lr' must be a number"),
    ("--train.max_steps=1.5", "'train.max_steps' must be an integer"),
    ("--train.amp=bf61", "one of auto, bf16, fp16, fp32.*Did you mean 'bf16'"),
    ("--train.lr=-1", "'train.lr' must be > 0"),
    ("--data.val_split=2", "'data.val_split' must be <= 0.9"),
    ("--model.rope=maybe", "'model.rope' must be true or false"),
    ("--train.betas=[0.9]", "must have 2 items"),
    ("train.lr", "--section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_keys_in_files_are_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  warmup_step: 10\n")
    with pytest.raises(ConfigError, match="unknown key 'train.warmup_step'.*Did you mean 'warmup_steps'"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config section 'optimizer'"):
        load_config(tmp_path / "d.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "e.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "e.yaml")


def test_round_trip_through_dict():
    cfg = load_config(None, ["--train.lr=1e-3", "--data.train_files=[x.txt]"])
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=100, n_heads=3)


def test_apply_override_keeps_other_keys():
    values = {"train": {"lr": 1.0}}
    apply_override(values, "--train.epochs=2")
    assert values == {"train": {"lr": 1.0, "epochs": "2"}}


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert config_reference_markdown() in readme, "README config reference is stale: paste config_reference_markdown()"


def test_example_configs_validate():
    paths = [p for ext in ("yaml", "toml", "json") for p in (ROOT / "examples/lm/configs").glob(f"*.{ext}")]
    assert {p.suffix for p in paths} == {".yaml", ".toml", ".json"}
    for path in paths:
        load_config(path)
