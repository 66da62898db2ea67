"""Move weights between psann's TransformerLM and Hugging Face `LlamaForCausalLM` (or
`Qwen3ForCausalLM`, the same network with QK-norm, for models trained with model.qk_norm).

The two architectures are the same network: pre-norm RMSNorm (computed in fp32), rotate-half
RoPE, grouped-query attention with scale 1/sqrt(head_dim), SwiGLU MLP, no biases. The only layout
difference is that psann fuses q/k/v into one `qkv` linear (rows: q, then k, then v) and gate/up
into one `gate_up` linear (rows: gate, then up); HF keeps them as separate linears. Conversion
therefore splits or concatenates rows; nothing is permuted. Qwen3 adds per-head RMSNorms of the
queries and keys before RoPE (q_norm, k_norm), as model.qk_norm does.

    hf = to_hf_llama(model)                  # psann -> transformers.LlamaForCausalLM
    model = from_hf_llama(hf_or_directory)   # transformers (or a save_pretrained dir) -> psann
    export_hf(model, tokenizer, "out/")      # a directory AutoModelForCausalLM / AutoTokenizer load
    model, tokenizer = import_hf("out/")     # and back

`transformers` is an optional extra (`pip install 'psann-lm[hf]'`) and is imported only here,
inside the functions.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..tokenizers import build_tokenizer
from .layers import SwiGLU
from .transformer import TransformerLM

logger = logging.getLogger(__name__)

__all__ = ["to_hf_llama", "llama_config_from", "model_config_from_llama", "from_hf_llama", "export_hf", "import_hf",
           "hf_tokenizer"]


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "Hugging Face interop needs the 'transformers' package, which is an optional extra of psann-lm; "
            "install it with: pip install 'psann-lm[hf]'"
        ) from exc
    return transformers


# ---------------------------------------------------------------------------------------------
# configs


def _check_convertible_config(cfg: ModelConfig) -> None:
    if cfg.base != "transformer":
        raise ConfigError(f"only the 'transformer' base converts to Hugging Face Llama; this model's base is "
                          f"'{cfg.base}'.")
    if not cfg.rope:
        raise ConfigError("Hugging Face Llama uses rotary position embeddings; this model was built with "
                          "model.rope=false (learned absolute positions) and cannot be converted.")
    if not cfg.causal:
        raise ConfigError("Hugging Face LlamaForCausalLM is causal; this model was built with model.causal=false.")
    beyond = [k for k, plain in (("mlp", "swiglu"), ("logit_softcap", None), ("value_embeddings", False))
              if getattr(cfg, k) != plain]
    if beyond:
        raise ConfigError(f"Hugging Face Llama and Qwen3 have no {', '.join('model.' + k for k in beyond)} (set to "
                          f"{', '.join(repr(getattr(cfg, k)) for k in beyond)}); only a model trained without them converts.")
    if cfg.vocab_size is None or cfg.max_seq_len is None:
        raise ConfigError("model.vocab_size and model.max_seq_len must be set before converting to Hugging Face.")


def llama_config_from(cfg: ModelConfig, **overrides: Any):
    """The `transformers.LlamaConfig` describing the same network as `cfg`.

    Keyword `overrides` are passed on to LlamaConfig (e.g. bos_token_id, attn_implementation).
    Token ids default to None: psann models carry no tokenizer, export_hf fills them in.
    """
    transformers = _transformers()
    _check_convertible_config(cfg)
    dropout = cfg.dropout or 0.0  # none (decided by the trainer) builds as 0
    attention_dropout = dropout if cfg.attention_dropout is None else cfg.attention_dropout
    if dropout > 0:
        logger.info("model.dropout=%s: HF Llama has no dropout on the residual branches, only attention_dropout "
                    "(%s here; inference is unaffected).", dropout, attention_dropout)
    values: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=min(cfg.init_std, 1.0),
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=False,
        attention_dropout=attention_dropout,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    values.update(overrides)
    if cfg.uses_qk_norm:  # Qwen3: Llama plus q_norm/k_norm; its MLP has no bias switch and no window here
        del values["mlp_bias"]
        return transformers.Qwen3Config(**values, use_sliding_window=False, sliding_window=None)
    return transformers.LlamaConfig(**values)


def _hf_model_class(cfg: ModelConfig):
    transformers = _transformers()
    return transformers.Qwen3ForCausalLM if cfg.uses_qk_norm else transformers.LlamaForCausalLM


def _rope_theta_of(hf_config) -> float:
    """RoPE base of a Llama config; ConfigError for any scaled/extended RoPE variant."""
    params = getattr(hf_config, "rope_parameters", None)
    scaling = getattr(hf_config, "rope_scaling", None)  # older transformers / configs
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if rope_type not in (None, "default"):
            raise ConfigError(f"Hugging Face config uses RoPE scaling {scaling!r}; psann supports only plain RoPE "
                              "(rope_type 'default').")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"Hugging Face config uses RoPE type '{rope_type}' ({params!r}); psann supports only "
                              "plain RoPE (rope_type 'default').")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    theta = getattr(hf_config, "rope_theta", None)
    return float(theta) if theta is not None else 10000.0


def model_config_from_llama(hf_config) -> ModelConfig:
    """psann ModelConfig for a `transformers.LlamaConfig`; ConfigError for features psann lacks."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ("llama", "qwen3"):
        raise ConfigError(f"expected a Hugging Face Llama or Qwen3 config (model_type 'llama' or 'qwen3'), got "
                          f"model_type {model_type!r}.")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"Hugging Face config uses activation '{act}'; psann's SwiGLU needs hidden_act 'silu'.")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise ConfigError(f"Hugging Face config sets {flag}=true; psann's linears have no biases.")
    window = getattr(hf_config, "use_sliding_window", False) if model_type == "qwen3" else getattr(hf_config, "sliding_window", None)
    if window:
        raise ConfigError("Hugging Face config uses sliding-window attention; psann attends over the whole context.")
    if (getattr(hf_config, "pretraining_tp", 1) or 1) > 1:
        logger.info("ignoring pretraining_tp=%s (a tensor-parallel detail of the original training; the "
                    "weights describe the same network).", hf_config.pretraining_tp)
    theta = _rope_theta_of(hf_config)
    d_model, n_heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or d_model // n_heads
    if head_dim * n_heads != d_model:
        raise ConfigError(f"Hugging Face config has head_dim {head_dim} x {n_heads} heads != hidden_size {d_model}; "
                          "psann derives head_dim as d_model / n_heads.")
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    dropout = float(getattr(hf_config, "attention_dropout", 0.0) or 0.0)
    return ModelConfig(
        base="transformer",
        d_model=d_model,
        n_layers=hf_config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_mlp=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope=True,
        rope_theta=theta,
        norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        dropout=dropout,
        init_std=float(getattr(hf_config, "initializer_range", 0.02) or 0.02),
        causal=True,
        qk_norm=model_type == "qwen3",
    )


# ---------------------------------------------------------------------------------------------
# weights


def _check_convertible_model(model: TransformerLM) -> None:
    if not isinstance(model, TransformerLM):
        raise ConfigError(f"expected a psann TransformerLM, got {type(model).__name__}.")
    _check_convertible_config(model.config)
    for i, block in enumerate(model.blocks):
        if type(block.mlp) is not SwiGLU:
            raise ConfigError(f"block {i} has MLP {type(block.mlp).__name__}; only the SwiGLU MLP maps to HF Llama.")


def _hf_state_dict(model: TransformerLM) -> dict[str, torch.Tensor]:
    """HF Llama parameter names -> tensors of `model` (split views; no copies)."""
    cfg = model.config
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = block.mlp.gate_up.weight.split(block.mlp.hidden, dim=0)
        sd.update({
            prefix + "input_layernorm.weight": block.attn_norm.weight,
            prefix + "self_attn.q_proj.weight": q,
            prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v,
            prefix + "self_attn.o_proj.weight": block.attn.out.weight,
            prefix + "post_attention_layernorm.weight": block.mlp_norm.weight,
            prefix + "mlp.gate_proj.weight": gate,
            prefix + "mlp.up_proj.weight": up,
            prefix + "mlp.down_proj.weight": block.mlp.down.weight,
        })
        if block.attn.q_norm is not None:
            sd.update({prefix + "self_attn.q_norm.weight": block.attn.q_norm.weight,
                       prefix + "self_attn.k_norm.weight": block.attn.k_norm.weight})
    return {name: t.detach() for name, t in sd.items()}


def _psann_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """psann TransformerLM parameter names -> tensors, from an HF Llama state dict."""
    def get(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise ConfigError(f"Hugging Face weights lack '{name}'; is this a LlamaForCausalLM checkpoint?")
        return hf_sd[name].detach()

    sd = {"embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    else:
        sd["lm_head.weight"] = get("lm_head.weight")
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        sd.update({
            ours + "attn_norm.weight": get(hf + "input_layernorm.weight"),
            ours + "attn.qkv.weight": torch.cat([get(hf + "self_attn.q_proj.weight"), get(hf + "self_attn.k_proj.weight"),
                                                 get(hf + "self_attn.v_proj.weight")], dim=0),
            ours + "attn.out.weight": get(hf + "self_attn.o_proj.weight"),
            ours + "mlp_norm.weight": get(hf + "post_attention_layernorm.weight"),
            ours + "mlp.gate_up.weight": torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")], dim=0),
            ours + "mlp.down.weight": get(hf + "mlp.down_proj.weight"),
        })
        if cfg.uses_qk_norm:
            sd.update({ours + "attn.q_norm.weight": get(hf + "self_attn.q_norm.weight"),
                       ours + "attn.k_norm.weight": get(hf + "self_attn.k_norm.weight")})
    return sd


def to_hf_llama(model: TransformerLM, *, attn_implementation: str = "sdpa", **config_overrides: Any):
    """A `transformers.LlamaForCausalLM` (Qwen3ForCausalLM with model.qk_norm) with the same config
    and a copy of `model`'s weights.

    The result has the model's dtype and device and the same train/eval mode. Tied embeddings stay
    tied. `config_overrides` go to the HF config (see llama_config_from).
    """
    _check_convertible_model(model)
    config = llama_config_from(model.config, **config_overrides)
    ref = model.embed.weight
    hf = _hf_model_class(model.config)._from_config(config, attn_implementation=attn_implementation)
    hf.to(device=ref.device, dtype=ref.dtype)
    hf.load_state_dict(_hf_state_dict(model), strict=True)
    hf.train(model.training)
    return hf


def from_hf_llama(hf_model_or_dir, *, dtype: torch.dtype | None = None) -> TransformerLM:
    """A psann TransformerLM from a `LlamaForCausalLM` instance or a local directory written by
    `save_pretrained` (or export_hf). Keeps the source's dtype and device unless `dtype` is given.
    """
    transformers = _transformers()
    if isinstance(hf_model_or_dir, (str, os.PathLike)):
        directory = Path(hf_model_or_dir).expanduser()
        if not (directory / "config.json").is_file():
            raise ConfigError(f"'{directory}' is not a Hugging Face model directory (no config.json); pass a "
                              "directory written by save_pretrained or export_hf, or a LlamaForCausalLM.")
        hf_config = transformers.AutoConfig.from_pretrained(directory)
        cfg = model_config_from_llama(hf_config)  # refuse unsupported features before reading the weights
        hf = _hf_model_class(cfg).from_pretrained(directory, config=hf_config, dtype=dtype if dtype is not None else "auto")
        hf.eval()
    else:
        hf = hf_model_or_dir
        if not isinstance(hf, transformers.PreTrainedModel) or not hasattr(hf, "lm_head"):
            raise ConfigError(f"expected a transformers LlamaForCausalLM or a model directory, got "
                              f"{type(hf).__name__}.")
    cfg = model_config_from_llama(hf.config)
    ref = hf.get_input_embeddings().weight
    model = TransformerLM(cfg)
    model.to(device=ref.device, dtype=dtype if dtype is not None else ref.dtype)
    model.load_state_dict(_psann_state_dict(hf.state_dict(), cfg), strict=True)
    model.train(hf.training)
    return model


# ---------------------------------------------------------------------------------------------
# export


BOS_PREFIX = "{{ bos_token }}"  # an exported chat template renders BOS first, as psann's chat prompts start
KIND_KEY = "psann_tokenizer_kind"  # in tokenizer_config.json: which psann tokenizer reads the files back


def hf_tokenizer(tokenizer, max_len: int):
    """`tokenizer` as a transformers PreTrainedTokenizerFast with the same ids. Encoding a text adds
    BOS first (psann prompts start with it), and the chat template renders BOS before the
    conversation, so `apply_chat_template` gives the ids `psannlm chat` feeds the model. psann's BPE
    and 'tokenizers' kinds convert; byte, char and sentencepiece have no tokenizer.json."""
    transformers = _transformers()
    import tokenizers  # lazy: with transformers, only an export needs it
    from tokenizers import processors

    if tokenizer.kind == "bpe":
        with tempfile.TemporaryDirectory() as tmp:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer.to_hf(tmp)))
    elif tokenizer.kind == "tokenizers":
        backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    else:
        raise ConfigError(f"the '{tokenizer.kind}' tokenizer has no Hugging Face tokenizer.json, so AutoTokenizer "
                          "could not load it; train with data.tokenizer=bpe (the default) or tokenizers to export.")
    names = tokenizer.special_tokens()

    def text(token_id):
        return None if token_id is None else names.get(token_id) or backend.id_to_token(token_id)

    bos = text(tokenizer.bos_id)
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=text(tokenizer.eos_id), pad_token=text(tokenizer.pad_id),
        unk_token=text(getattr(tokenizer, "unk_id", None)), model_max_length=max_len,
        clean_up_tokenization_spaces=False)
    fast.chat_template = BOS_PREFIX + tokenizer.chat_template
    return fast


def export_hf(model: TransformerLM, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir` so that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads the
    model (config.json, generation_config.json with bos/eos/pad, model.safetensors) and, with a
    tokenizer, `AutoTokenizer.from_pretrained(out_dir)` the tokenizer (see hf_tokenizer;
    tokenizer.json, tokenizer_config.json with the chat template, special_tokens_map.json)."""
    out = Path(out_dir).expanduser()
    ids: dict[str, Any] = {}
    fast = None
    if tokenizer is not None:
        fast = hf_tokenizer(tokenizer, model.config.max_seq_len)
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model embeds "
                              f"{model.config.vocab_size}; they do not belong together.")
    hf = to_hf_llama(model, **ids)
    for name, value in ids.items():
        setattr(hf.generation_config, name, value)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    if fast is not None:
        fast.save_pretrained(out)
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config[KIND_KEY] = tokenizer.kind
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # transformers 5 keeps the roles in tokenizer_config.json only; the older file is still read widely
        roles = {f"{r}_token": getattr(fast, f"{r}_token") for r in ("bos", "eos", "pad", "unk")}
        (out / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in roles.items() if v}, indent=2) + "\n",
                                                     encoding="utf-8")
    logger.info("exported model%s to %s", " and tokenizer" if fast is not None else "", out)
    return out


def import_hf(directory: str | os.PathLike):
    """(TransformerLM in fp32, tokenizer) from a Hugging Face Llama directory (export_hf's, or any
    Llama with a tokenizer.json). A chat template that renders BOS first loses that part: psann
    prompts add BOS themselves."""
    directory = Path(directory).expanduser()
    model = from_hf_llama(directory, dtype=torch.float32)
    config_path = directory / "tokenizer_config.json"
    kind = "auto"
    if config_path.is_file():
        kind = json.loads(config_path.read_text(encoding="utf-8")).get(KIND_KEY, "auto")
    tokenizer = build_tokenizer(kind if kind in ("bpe", "tokenizers") else "auto", model_path=directory)
    template = getattr(tokenizer, "_chat_template", None)
    if template and template.startswith(BOS_PREFIX):
        tokenizer.chat_template = template[len(BOS_PREFIX):]
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model embeds "
                          f"{model.config.vocab_size}.")
    return model, tokenizer
