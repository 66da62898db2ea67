"""Properties every model family must have, checked for every base and wave option."""

import copy

import pytest
import torch
import torch.nn.functional as F

from psann.lm.errors import ConfigError
from psann.lm.models import build_model, count_parameters
from psann.lm.models.waveresnet import WaveDecoderBlock
from psann.lm.tokenizers import ByteTokenizer
from psann.lm.config import RunConfig
from psann.lm.train import checkpoint as ckpt
from psann.lm.train.parallel import apply_activation_checkpointing

from conftest import tiny_config

VARIANTS = {
    "transformer": dict(base="transformer"),
    "respsann": dict(base="respsann"),
    "waveresnet": dict(base="waveresnet"),
    "waveresnet-replace": dict(base="waveresnet", wave_mode="replace"),
    "waveresnet-off": dict(base="waveresnet", wave_mode="off"),
    "waveresnet-k5-growth3": dict(base="waveresnet", wave_kernel_size=5, wave_dilation_growth=3, wave_dilation_cycle=2),
    "respsann-frozen-sine": dict(base="respsann", sine_params={"trainable": False}),
}


def make(name, **extra):
    torch.manual_seed(0)
    return build_model(tiny_config(**{"n_layers": 3, **VARIANTS[name], **extra})).eval()


@pytest.fixture(params=list(VARIANTS))
def name(request):
    return request.param


def test_causal_exactly(name):
    model = make(name)
    x = torch.randint(0, 61, (2, 24))
    for t in (0, 9, 23):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 61
        a, b = model(x), model(y)
        assert torch.equal(a[:, :t], b[:, :t])
        assert not torch.allclose(a[:, t:], b[:, t:])


def test_incremental_decoding_equals_full_forward(name):
    model = make(name)
    x = torch.randint(0, 61, (2, 30))
    full = model(x)
    cache = model.new_cache(2, 64)
    parts = [model(x[:, :6], cache=cache), model(x[:, 6:13], cache=cache)]
    parts += [model(x[:, t:t + 1], cache=cache) for t in range(13, 30)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_left_padded_rows_equal_unpadded(name):
    model = make(name)
    rows = [torch.randint(1, 61, (n,)) for n in (4, 15, 9)]
    ids = torch.zeros(3, 15, dtype=torch.long)
    mask = torch.zeros(3, 15, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 15 - len(r):], mask[i, 15 - len(r):] = r, 1
    batched = model(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        assert (batched[i, 15 - len(r):] - model(r[None])[0]).abs().max() < 1e-5


def test_checkpoint_round_trip(name, tmp_path):
    model = make(name, vocab_size=ByteTokenizer().vocab_size)
    config = RunConfig.from_dict({"model": model.config.to_dict()})
    ckpt.save_checkpoint(tmp_path / "c", model, ByteTokenizer(), config)
    loaded, _, _ = ckpt.load_checkpoint(tmp_path / "c")
    x = torch.randint(0, 61, (2, 12))
    assert torch.equal(model(x), loaded.eval()(x))


def test_activation_checkpointing_gives_the_same_gradients(name):
    model = make(name).train()
    twin = copy.deepcopy(model)
    assert apply_activation_checkpointing(twin) == 3
    x = torch.randint(0, 61, (2, 16))
    for m in (model, twin):
        F.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), n
    assert twin.state_dict().keys() == model.state_dict().keys()


def test_the_two_sine_bases_are_different_networks():
    res, wave = make("respsann"), make("waveresnet")
    assert count_parameters(wave) > count_parameters(res)
    assert all(isinstance(b, WaveDecoderBlock) for b in wave.blocks)
    x = torch.randint(0, 61, (1, 10))
    assert not torch.allclose(res(x), wave(x))


def test_wave_options():
    wave = make("waveresnet", n_layers=6)
    assert [b.wave.conv.dilation[0] for b in wave.blocks] == [1, 2, 4, 8, 1, 2]
    replace = make("waveresnet-replace")
    assert all(b.mlp is None and b.mlp_norm is None and b.attn is not None for b in replace.blocks)
    assert not any(name.endswith("mlp.fc1.weight") for name in replace.state_dict())
    assert not any(isinstance(b, WaveDecoderBlock) for b in make("waveresnet-off").blocks)
    with pytest.raises(ConfigError, match="only applies to base 'waveresnet'"):
        tiny_config(base="respsann", wave_mode="replace")


def test_sine_mlp_defaults_to_four_times_width_with_unit_gain():
    m = make("respsann")
    assert m.blocks[0].mlp.fc1.out_features == 4 * 32
    assert m.blocks[0].mlp.alpha.item() == 1.0
