import pytest
import torch

from psann.lm.errors import ConfigError
from psann.lm.models import build_model, count_parameters
from psann.lm.train.optim import parameter_groups

from conftest import tiny_config

VARIANTS = {
    "default": {},
    "gqa": {"n_kv_heads": 2},
    "untied": {"tie_embeddings": False},
    "learned_positions": {"rope": False},
}


@pytest.fixture(params=list(VARIANTS))
def model(request):
    torch.manual_seed(0)
    return build_model(tiny_config(**VARIANTS[request.param])).eval()


def test_causality_exact(model):
    x = torch.randint(0, 61, (2, 20))
    y = x.clone()
    y[:, 11] = (y[:, 11] + 1) % 61
    a, b = model(x), model(y)
    assert torch.equal(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_bidirectional_switch_sees_the_future():
    torch.manual_seed(0)
    m = build_model(tiny_config(causal=False)).eval()
    x = torch.randint(0, 61, (1, 12))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 61
    assert not torch.allclose(m(x)[:, 0], m(y)[:, 0])


def test_incremental_cache_equals_full_forward(model):
    x = torch.randint(0, 61, (2, 24))
    full = model(x)
    cache = model.new_cache(2, 64)
    parts = [model(x[:, :7], cache=cache), model(x[:, 7:15], cache=cache)]
    parts += [model(x[:, t:t + 1], cache=cache) for t in range(15, 24)]
    assert cache.length == 24
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_left_padding_rows_equal_unpadded(model):
    pad = 0
    rows = [torch.randint(1, 61, (n,)) for n in (5, 12, 9)]
    width = 12
    ids = torch.full((3, width), pad)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    batched = model(ids, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for i, r in enumerate(rows):
        single = model(r[None])
        assert (batched[i, width - len(r):] - single[0]).abs().max() < 1e-5


def test_tied_embeddings_share_storage_and_count_once():
    tied = build_model(tiny_config())
    untied = build_model(tiny_config(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert count_parameters(untied) - count_parameters(tied) == 61 * 32


def test_weight_decay_only_on_matrices():
    m = build_model(tiny_config(tie_embeddings=False))
    decay, no_decay = parameter_groups(m, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert id(m.embed.weight) not in decay_ids
    assert all(id(b.attn_norm.weight) not in decay_ids for b in m.blocks)
    assert id(m.blocks[0].attn.qkv.weight) in decay_ids and id(m.lm_head.weight) in decay_ids
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_unknown_bases_are_clear():
    with pytest.raises(ConfigError, match="Did you mean 'transformer'.*respsann, transformer, waveresnet"):
        build_model(tiny_config(base="transfromer"))
    with pytest.raises(ConfigError, match="sine_params"):
        build_model(tiny_config(sine_params={"amp_init": 1.0}))


def test_config_shape_checks():
    with pytest.raises(ConfigError, match="divisible"):
        tiny_config(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        tiny_config(n_kv_heads=3)


def test_default_mlp_width_is_swiglu_sized():
    assert tiny_config(d_model=256).mlp_hidden == 704  # 8/3 * 256 = 682.7, rounded up to a multiple of 64
    assert tiny_config(d_mlp=100).mlp_hidden == 100
