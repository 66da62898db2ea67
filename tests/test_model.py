import pytest
import torch

from psann.lm.config import ModelConfig
from psann.lm.errors import ConfigError
from psann.lm.models import build_model, count_parameters
from psann.lm.train.optim import parameter_groups

from conftest import tiny_config

VARIANTS = {
    "default": {},
    "gqa": {"n_kv_heads": 2},
    "untied": {"tie_embeddings": False},
    "learned_positions": {"rope": False},
    "recipe_options": {"qk_norm": True, "mlp": "relu2", "logit_softcap": 5.0, "tie_embeddings": False,
                       "value_embeddings": True},
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


def test_qk_norm_makes_attention_blind_to_query_and_key_scale():
    torch.manual_seed(0)
    x = torch.randint(0, 61, (2, 12))
    change = {}
    for qk_norm in (True, False):
        torch.manual_seed(0)
        m = build_model(tiny_config(qk_norm=qk_norm, init_std=0.5)).eval()
        before = m(x)
        with torch.no_grad():
            for block in m.blocks:  # q and k rows of the fused projection, times 7
                block.attn.qkv.weight[:2 * 32] *= 7.0
        change[qk_norm] = (m(x) - before).abs().max().item()
    assert change[True] < 1e-4 and change[False] > 1e-1


def test_relu2_mlp_is_relu_squared_at_hidden_ratio_width():
    torch.manual_seed(0)
    m = build_model(tiny_config(mlp="relu2", d_model=128, n_heads=4)).eval()
    mlp = m.blocks[0].mlp
    assert mlp.up.weight.shape == (512, 128)  # hidden_ratio 4 x 128, ungated
    h = torch.randn(3, 128)
    assert torch.allclose(mlp(h), torch.relu(h @ mlp.up.weight.T).pow(2) @ mlp.down.weight.T, atol=1e-5)


def test_logit_softcap_bounds_the_logits_smoothly():
    torch.manual_seed(0)
    capped = build_model(tiny_config(logit_softcap=2.0, init_std=0.3)).eval()
    plain = build_model(tiny_config(init_std=0.3)).eval()
    plain.load_state_dict(capped.state_dict())
    x = torch.randint(0, 61, (2, 10))
    raw = plain(x)
    assert raw.abs().max() > 2.0  # the cap is active on these logits
    assert torch.allclose(capped(x), 2.0 * torch.tanh(raw / 2.0), atol=1e-5)
    assert capped(x).abs().max() <= 2.0


def test_zero_init_residual_starts_every_block_as_the_identity_and_still_learns():
    torch.manual_seed(0)
    m = build_model(tiny_config(zero_init_residual=True))
    assert all(b.attn.out.weight.abs().sum() == 0 and b.mlp.down.weight.abs().sum() == 0 for b in m.blocks)
    x = torch.randint(0, 61, (2, 10))
    h = m.embed(x)
    assert torch.equal(m(x), m.lm_head(m.norm(h)))  # blocks add nothing yet
    m(x).logsumexp(-1).mean().backward()
    assert all(b.attn.out.weight.grad.abs().sum() > 0 and b.mlp.down.weight.grad.abs().sum() > 0 for b in m.blocks)


def test_value_embeddings_add_a_token_lookup_to_every_layers_values():
    torch.manual_seed(0)
    plain, with_ve = build_model(tiny_config()), build_model(tiny_config(value_embeddings=True))
    assert count_parameters(with_ve) - count_parameters(plain) == 2 * 61 * 32  # n_layers x vocab x kv width
    x = torch.randint(0, 61, (2, 10))
    before = with_ve(x)
    with torch.no_grad():
        with_ve.blocks[1].attn.value_embed.weight[x[0, 3]] += 1.0  # only token x[0, 3]'s values change
    after = with_ve(x)
    changed = (after - before).abs().amax(-1) > 1e-6
    first = int((x[0] == x[0, 3]).nonzero()[0])
    assert not changed[0, :first].any() and changed[0, first:].all()  # causal: from its first occurrence on


def test_recipe_options_are_refused_where_they_do_not_apply():
    with pytest.raises(ConfigError, match="model.mlp.*sine"):
        tiny_config(base="respsann", mlp="relu2")
    with pytest.raises(ConfigError, match="hgrn_bit"):
        tiny_config(base="byte", layer_type="hgrn_bit", qk_norm=True, vocab_size=256)
    with pytest.raises(ConfigError, match="value_embeddings.*H-Net"):
        ModelConfig(base="hnet", value_embeddings=True)
    with pytest.raises(ConfigError, match="logit_softcap"):
        tiny_config(logit_softcap=0.0)
