"""psann TransformerLM <-> Hugging Face LlamaForCausalLM: same logits, same greedy tokens, export."""

from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from psann.lm.config import GenerateConfig, ModelConfig  # noqa: E402
from psann.lm.errors import ConfigError  # noqa: E402
from psann.lm.objectives.causal import generate_tokens  # noqa: E402
from psann.lm.models import build_model  # noqa: E402
from psann.lm.models.hf_interop import (  # noqa: E402
    export_hf,
    from_hf_llama,
    llama_config_from,
    model_config_from_llama,
    to_hf_llama,
)
from psann.lm.tokenizers import build_tokenizer  # noqa: E402

VOCAB = 97
ATOL = 1e-4


def tiny_config(tied: bool, **overrides) -> ModelConfig:
    values = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=160, vocab_size=VOCAB, max_seq_len=64,
                  rope_theta=5000.0, norm_eps=1e-6, tie_embeddings=tied)
    values.update(overrides)
    return ModelConfig(**values)


def randomize_norms(module: torch.nn.Module) -> None:
    """Norm gains start at 1 on both sides, which would hide a swapped mapping; make them distinct."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))


def ours(tied: bool, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(tiny_config(tied, **overrides))
    randomize_norms(model)
    return model.eval()


def random_ids(batch: int = 3, length: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(psann_model, hf_model, ids=None) -> None:
    ids = random_ids() if ids is None else ids
    with torch.no_grad():
        a = psann_model(ids)
        b = hf_model(input_ids=ids).logits
    assert a.shape == b.shape == (*ids.shape, VOCAB)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tied,qk_norm", [(True, False), (False, False), (True, True)])
def test_ours_to_hf_same_logits(tied, qk_norm):
    model = ours(tied, qk_norm=qk_norm)
    hf = to_hf_llama(model).eval()
    assert isinstance(hf, transformers.Qwen3ForCausalLM if qk_norm else transformers.LlamaForCausalLM)
    assert hf.config.num_key_value_heads == 2 and hf.config.intermediate_size == 160
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    assert hf.config._attn_implementation == "sdpa"
    assert_same_logits(model, hf)


@pytest.mark.parametrize("tied", [True, False])
def test_hf_to_ours_same_logits(tied):
    torch.manual_seed(2)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
    )
    hf = transformers.LlamaForCausalLM(config)
    randomize_norms(hf)
    hf.eval()
    model = from_hf_llama(hf)
    assert model.config.kv_heads == 2 and model.config.mlp_hidden == 96 and model.config.rope_theta == 20000.0
    assert (model.lm_head.weight is model.embed.weight) == tied
    assert not model.training
    assert_same_logits(model, hf)


def test_qwen3_to_ours_same_logits():
    torch.manual_seed(4)
    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf = transformers.Qwen3ForCausalLM(config)
    randomize_norms(hf)  # q_norm / k_norm gains too
    model = from_hf_llama(hf.eval())
    assert model.config.qk_norm and model.blocks[0].attn.q_norm is not None
    assert_same_logits(model, hf)


def test_llama_config_round_trip():
    cfg = tiny_config(tied=False)
    back = model_config_from_llama(llama_config_from(cfg))
    for key in ("d_model", "n_layers", "n_heads", "kv_heads", "mlp_hidden", "vocab_size", "max_seq_len",
                "rope_theta", "norm_eps", "tie_embeddings"):
        assert getattr(back, key) == getattr(cfg, key), key


@pytest.mark.parametrize("tied,qk_norm", [(True, False), (False, False), (False, True)])
def test_export_loads_with_auto_model_and_back(tmp_path, tied, qk_norm):
    model = ours(tied, seed=3, qk_norm=qk_norm)
    out = export_hf(model, None, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, transformers.Qwen3ForCausalLM if qk_norm else transformers.LlamaForCausalLM)
    assert_same_logits(model, loaded.eval())
    again = from_hf_llama(out)  # from a saved directory
    assert again.config.tie_embeddings == tied and again.config.qk_norm == qk_norm
    assert_same_logits(again, loaded)


def test_export_with_hf_tokenizer(tmp_path):
    texts = ["the cat sat on the mat", "a dog ran in the park and the cat ran too"] * 20
    tok = build_tokenizer("tokenizers", texts, vocab_size=300)
    torch.manual_seed(4)
    model = build_model(tiny_config(True, vocab_size=tok.vocab_size)).eval()
    out = export_hf(model, tok, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the cat ran in the park"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.bos_token_id == tok.bos_id
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.eos_token_id == tok.eos_id and loaded.config.pad_token_id == tok.pad_id
    # psann itself can load the exported directory as a tokenizer path
    again = build_tokenizer("auto", model_path=str(out))
    assert again.encode(text) == tok.encode(text) and again.eos_id == tok.eos_id
    assert hf_tok.model_max_length == model.config.max_seq_len


def test_export_refuses_a_tokenizer_without_an_hf_form(tmp_path):
    tok = build_tokenizer("byte")
    torch.manual_seed(5)
    model = build_model(tiny_config(True, vocab_size=tok.vocab_size)).eval()
    with pytest.raises(ConfigError, match="'byte' tokenizer has no Hugging Face tokenizer.json"):
        export_hf(model, tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_greedy_generation_matches_hf():
    model = ours(tied=True, seed=6)
    with torch.no_grad():  # larger weights -> confident, tie-free argmaxes
        model.lm_head.weight.mul_(8.0)
    hf = to_hf_llama(model).eval()
    prompts = [[5, 17, 3], [42], list(range(10, 26))]
    n_new = 24
    got = generate_tokens(model, prompts, GenerateConfig(max_new_tokens=n_new, temperature=0.0),
                          eos_id=None, pad_id=0, max_seq_len=64)
    for prompt, new in zip(prompts, got):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
                               min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
        assert new == expected[0, len(prompt):].tolist()


def test_unsupported_features_are_config_errors():
    with pytest.raises(ConfigError, match="rope"):
        to_hf_llama(build_model(tiny_config(True, rope=False)))
    with pytest.raises(ConfigError, match="Qwen3 have no model.mlp, model.value_embeddings"):
        to_hf_llama(build_model(tiny_config(True, mlp="relu2", value_embeddings=True)))
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    bad = {
        "bias": dict(attention_bias=True),
        "mlp_bias": dict(mlp_bias=True),
        "activation": dict(hidden_act="gelu"),
        "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    }
    for match, extra in bad.items():
        with pytest.raises(ConfigError, match=match):
            model_config_from_llama(transformers.LlamaConfig(**base, **extra))
    sliding = transformers.LlamaConfig(**base)
    sliding.sliding_window = 32
    with pytest.raises(ConfigError, match="sliding"):
        model_config_from_llama(sliding)
    with pytest.raises(ConfigError, match="config.json"):
        from_hf_llama("/nonexistent/dir")


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install 'psann-lm\[hf\]'"):
        llama_config_from(tiny_config(True))
