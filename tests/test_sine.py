import pytest
import torch
import torch.nn.functional as F

from psann.lm.config import load_config
from psann.lm.errors import ConfigError
from psann.lm.models import build_model
from psann.lm.train.optim import parameter_groups
from psann.sine import SineConfig, SineParam

from conftest import tiny_config


def reference(z, A, f, d, mode):
    g = {"abs": z.abs(), "relu": F.relu(z), "none": torch.zeros_like(z)}[mode]
    return A * torch.exp(-d * g) * torch.sin(f * z)


@pytest.mark.parametrize("mode", ["abs", "relu", "none"])
def test_values_match_the_formula(mode):
    torch.manual_seed(0)
    act = SineParam(7, SineConfig(amp_init=1.5, freq_init=2.0, damp_init=0.3, amp_init_std=0.2,
                                  freq_init_std=0.3, damp_init_std=0.05, decay_mode=mode))
    z = 3 * torch.randn(4, 5, 7)
    A, f, d = F.softplus(act.a_raw), F.softplus(act.b_raw) + 1e-6, F.softplus(act.c_raw)
    assert torch.allclose(act(z), reference(z, A, f, d, mode), atol=1e-6)
    assert A.std() > 0 and f.std() > 0  # per-feature init noise was applied


def test_init_values_are_exact_through_inverse_softplus():
    act = SineParam(3, SineConfig(amp_init=1.0, freq_init=2.25, damp_init=0.001))
    assert torch.allclose(act.amplitude(), torch.full((3,), 1.0), atol=1e-6)
    assert torch.allclose(act.frequency(), torch.full((3,), 2.25), atol=1e-5)
    assert torch.allclose(act.decay(), torch.full((3,), 0.001), atol=1e-7)


def test_feature_axis_for_conv_layouts():
    torch.manual_seed(0)
    act = SineParam(6, SineConfig(amp_init_std=0.3, freq_init_std=0.3), dim=1)
    last = SineParam(6, SineConfig())
    last.load_state_dict(act.state_dict())
    z = torch.randn(2, 6, 9)  # (B, C, T)
    assert torch.allclose(act(z), last(z.transpose(1, 2)).transpose(1, 2))


def test_bounds_clamp():
    act = SineParam(2, SineConfig(amp_init=5.0, amp_bounds=(0.1, 2.0), freq_init=0.01, freq_bounds=[0.5, 3.0]))
    assert torch.allclose(act.amplitude(), torch.full((2,), 2.0))
    assert torch.allclose(act.frequency(), torch.full((2,), 0.5))


@pytest.mark.parametrize("cfg,expected", [
    ({}, {"a_raw", "b_raw", "c_raw"}),
    ({"learnable": ["amplitude"]}, {"a_raw"}),
    ({"learnable": ["frequency", "decay"]}, {"b_raw", "c_raw"}),
    ({"trainable": False}, set()),
])
def test_gradients_reach_exactly_the_learnable_subset(cfg, expected):
    act = SineParam(4, SineConfig(**cfg))
    z = torch.randn(3, 4, requires_grad=True)  # so backward runs even when every sine parameter is frozen
    act(z).sum().backward()
    got = {name for name, p in act.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == expected
    assert {name for name, p in act.named_parameters() if p.requires_grad} == expected


@pytest.mark.parametrize("values,match", [
    ({"amp_int": 1.0}, "Did you mean 'amp_init'"),
    ({"learnable": ["amplitud"]}, "Did you mean 'amplitude'"),
    ({"decay_mode": "abss"}, "Did you mean 'abs'"),
    ({"damp_init": -1}, "damp_init"),
    ({"freq_bounds": [3, 1]}, "low <= high"),
])
def test_bad_sine_params_are_named(values, match):
    with pytest.raises(ConfigError, match=match):
        SineConfig.from_dict(values)
    with pytest.raises(ConfigError, match=match):  # validated wherever the model is configured
        tiny_config(base="respsann", sine_params=values)


def test_sine_params_from_command_line_overrides():
    cfg = load_config(None, ["--model.base=respsann", "--model.sine_params.learnable=[amplitude]",
                             "--model.sine_params.freq_init=2.25"])
    assert cfg.model.sine_params == {"learnable": ["amplitude"], "freq_init": 2.25}
    with pytest.raises(ConfigError, match="Did you mean 'freq_init'"):
        load_config(None, ["--model.base=respsann", "--model.sine_params.freq_int=2"])


def test_sine_parameters_skip_weight_decay_and_take_their_lr_multiplier():
    model = build_model(tiny_config(base="waveresnet", sine_params={"lr_mult": 3.0}))
    groups = parameter_groups(model, 0.1)
    sine_ids = {id(p) for n, p in model.named_parameters() if n.endswith(("a_raw", "b_raw", "c_raw"))}
    (sine_group,) = [g for g in groups if g["lr_mult"] == 3.0]
    assert {id(p) for p in sine_group["params"]} == sine_ids and sine_group["weight_decay"] == 0.0
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not decayed & sine_ids and id(model.blocks[0].mlp.fc1.weight) in decayed
    assert id(model.blocks[0].mlp.alpha) not in decayed
