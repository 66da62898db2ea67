"""Configuration: four small dataclasses, loaded from YAML/TOML/JSON, overridden from the command line.

Every field carries its help text, valid choices, range and where it applies (`only`) in `metadata`
(config_fields.py); the same metadata drives validation (on construction, whatever the source), `--section.key=value`
parsing and the config reference in the README. Plain dataclasses + difflib suggestions keep this
dependency-free and let the configs double as keyword arguments of the Python API. Checks that need
a model family's code (e.g. H-Net's stage structure) are models.check_model_config's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from .config_fields import Validated, option, plain
from .errors import ConfigError, did_you_mean

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Choices whose code lives higher up (tokenizers, report.loggers), here so that config imports nothing above it.
TOKENIZER_KINDS: tuple[str, ...] = ("auto", "byte", "char", "simple", "bpe", "sentencepiece", "tokenizers")
LOGGERS = ("console", "json", "jsonl", "csv", "tensorboard", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


def check_logger_names(names: typing.Iterable[str]) -> None:
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"'train.loggers' has unknown logger {name!r}.{did_you_mean(name, LOGGERS)} "
                              f"Choices: {', '.join(LOGGERS)}.")


@dataclass
class ModelConfig(Validated):
    section: typing.ClassVar[str] = "model"
    base: str = option("transformer", "Model family; `psannlm` lists the registered bases (transformer, ...).")
    d_model: int | list[int] = option(512, "Width of the residual stream; for base hnet one width per stage, outer to inner (e.g. [384, 512, 768]).", min=1)
    n_layers: int = option(8, "Number of decoder blocks.", min=1)
    n_heads: int = option(8, "Attention heads; must divide d_model.", min=1)
    n_kv_heads: int | None = option(None, "Key/value heads for grouped-query attention (default: n_heads); must divide n_heads.", min=1)
    d_mlp: int | None = option(None, "MLP hidden size (default from hidden_ratio: gated MLPs 2/3 * hidden_ratio * d_model rounded up to a multiple of 64, i.e. 8/3 * d_model; sine bases hidden_ratio * d_model).", min=1)
    hidden_ratio: float = option(4.0, "MLP expansion when d_mlp is unset (the seed's name); per stage width for base hnet.", min=0.0, min_exclusive=True)
    vocab_size: int | None = option(None, "Vocabulary size (default: the tokenizer's).", min=1)
    max_seq_len: int | None = option(None, "Context window in tokens (default: data.max_length); longer prompts are truncated from the left.", min=1)
    rope: bool = option(True, "Rotary position embeddings; false uses learned absolute position embeddings.")
    rope_theta: float = option(10000.0, "RoPE base frequency.", min=0.0, min_exclusive=True)
    norm_eps: float = option(1e-5, "RMSNorm epsilon.", min=0.0, min_exclusive=True)
    tie_embeddings: bool = option(True, "Share the token embedding with the output head.")
    qk_norm: bool | None = option(None, "RMSNorm each head's queries and keys before RoPE (OLMo 2, Qwen3, modded-nanogpt): attention logits stay bounded; with Muon it is worth 1-2% of loss (docs/results/recipe.md). Default (none): on for attention layers (hgrn_bit has none). Exports as HF Qwen3 (false: Llama).")
    mlp: str = option("swiglu", "MLP of the attention blocks: swiglu (gated, hidden 2/3 * hidden_ratio * d_model) or relu2 (ReLU squared, ungated, hidden hidden_ratio * d_model; modded-nanogpt, nanochat). The sine bases have their own MLP.", choices=("swiglu", "relu2"),
                    only={"base": ("transformer", "byte", "hnet")}, only_label="the bases transformer, byte and hnet (the sine bases use sine MLPs)")
    logit_softcap: float | None = option(None, "Soft-cap the output logits: cap * tanh(logits / cap) (Gemma 2, modded-nanogpt use 15-30); none: off.", min=0.0, min_exclusive=True)
    value_embeddings: bool = option(False, "Give every attention layer a token embedding of its own added to its values (modded-nanogpt, nanochat): vocab_size x d_model lookup parameters per layer, no extra matmuls.",
                                  only={"base": ("transformer", "byte", "respsann", "waveresnet")}, only_label="the flat bases (an H-Net's inner stages see chunks, not tokens)")
    zero_init_residual: bool = option(False, "Start the projections that write into the residual stream (attention and MLP outputs) at zero, so every block begins as the identity (modded-nanogpt, nanochat).")
    dropout: float | None = option(None, "Dropout on the residual branches (and on the attention weights unless attention_dropout is set) during training. Default (none): 0.1 on the residual branches when the run reads its training text at least 5 times (the default recipe over-fits a small corpus it repeats; docs/results/recipe.md), else 0.", min=0.0, max=1.0)
    attention_dropout: float | None = option(None, "Dropout on the attention weights during training; default (none): model.dropout as set, 0 when the repeated-text rule sets it. Above 0 the CPU's fused attention kernel is not used: a step of a 2.6M-parameter model took ~1.4x as long.", min=0.0, max=1.0)
    init_std: float = option(0.02, "Std of the normal init; residual output projections are scaled by 1/sqrt(2*n_layers).", min=0.0, min_exclusive=True)
    causal: bool = option(True, "Causal (autoregressive) attention; false gives bidirectional attention (objective diffusion sets it false).")
    objective: str = option("causal", "causal: next-token prediction; diffusion: a masked diffusion LM (bidirectional attention, a mask token after the tokenizer's ids, block-diffusion sampling).", choices=("causal", "diffusion"), sets={"diffusion": {"causal": False}})
    mask_token_id: int | None = option(None, "diffusion only: id of the mask token (default: the tokenizer's vocabulary size, i.e. one id appended after it).", min=0, only={"objective": ("diffusion",)})
    noise_epsilon: float = option(1e-3, "diffusion only: masking probability p = (1 - eps) t + eps, so no sequence goes unmasked and 1/p stays <= 1/eps.", min=0.0, max=1.0, min_exclusive=True, only={"objective": ("diffusion",)})
    random_trunc_prob: float = option(0.01, "diffusion only: probability that a training batch is cut to a random length in [1, max_length].", min=0.0, max=1.0, only={"objective": ("diffusion",)})
    shift_logits: bool = option(False, "diffusion only: predict each position from the output one position to its left, as a causal LM's head does (DiffuLLaMA, Dream; the first position keeps its own), so a causal checkpoint (train.init_from) starts the denoiser where it left off.", only={"objective": ("diffusion",)})
    t_sampling: str = option("stratified", "diffusion only: how the batch's noise levels t are drawn: uniform (independent), stratified ((i + u) / B), antithetic (t and 1 - t pairs).", choices=("uniform", "stratified", "antithetic"), only={"objective": ("diffusion",)})
    sine_params: dict[str, Any] | None = option(None, "Sine activation of the PSANN bases: amp_init, freq_init, damp_init, *_init_std, decay_mode (abs|relu|none), trainable, learnable (subset of amplitude/frequency/decay), amp/freq/damp_bounds, lr_mult.")
    layer_type: str = option("transformer", "Blocks of the byte-level bases (byte, hnet): transformer (attention + SwiGLU) or hgrn_bit (HGRN gated linear recurrence + GLU, BitLinear ternary weights / int8 activations).", choices=("transformer", "hgrn_bit"),
                           only={"base": ("byte", "hnet")}, only_label="the byte-level bases byte and hnet")
    expand_ratio: int = option(1, "hgrn_bit only: width of the recurrence = expand_ratio * d_model.", min=1, only={"layer_type": ("hgrn_bit",)})
    num_blocks: list[list[int]] | None = option(None, "hnet only: blocks per stage, outer to inner: [encoder, 0, decoder] for each chunking stage, then [main] (e.g. [[3, 0, 3], [6]]).", only={"base": ("hnet",)})
    target_compression: list[float] | None = option(None, "hnet only: target bytes per chunk at each chunking stage (default 6 for one stage, 3 per stage for more).", only={"base": ("hnet",)})
    ratio_loss_weight: float = option(0.03, "hnet only: weight of the ratio loss that steers each stage to its target compression.", min=0.0, only={"base": ("hnet",)})
    stage_lr_mult: list[float] | None = option(None, "hnet only: learning-rate multiplier per stage, outer to inner (default 1 each; the H-Net recipe uses larger ones outside).", only={"base": ("hnet",)})
    wave_mode: str = option("interleave", "waveresnet only: wave blocks after the MLP (interleave), instead of it (replace), or none (off).", choices=("interleave", "replace", "off"), only={"base": ("waveresnet",)})
    wave_kernel_size: int = option(3, "waveresnet only: kernel of the causal depthwise convolution over time.", min=1, only={"base": ("waveresnet",)})
    wave_dilation_growth: int = option(2, "waveresnet only: dilation of layer i is growth ** (i % cycle).", min=1, only={"base": ("waveresnet",)})
    wave_dilation_cycle: int = option(4, "waveresnet only: layers after which the dilation starts again at 1.", min=1, only={"base": ("waveresnet",)})

    def check(self) -> None:
        if self.sine_params is not None:
            from psann.sine import SineConfig  # lazy: psann.sine imports torch; config stays torch-free

            SineConfig.from_dict(self.sine_params)  # validate every key now, whatever the source
        for width in self.widths:
            if width < 1:
                raise ConfigError(f"'model.d_model' widths must be >= 1, got {self.d_model}.")
            if width % self.n_heads:
                raise ConfigError(f"'model.d_model' ({width}) must be divisible by 'model.n_heads' ({self.n_heads}).")
            if (width // self.n_heads) % 2 and self.rope and self.layer_type == "transformer":
                raise ConfigError(f"RoPE needs an even head size; d_model/n_heads = {width // self.n_heads}. Change d_model or n_heads.")
        if self.layer_type == "hgrn_bit" and (self.qk_norm or self.mlp != "swiglu" or self.value_embeddings):  # qk_norm None: its default, off here
            raise ConfigError("'model.qk_norm', 'model.mlp' and 'model.value_embeddings' shape attention blocks; "
                              "layer_type hgrn_bit has a recurrence and its own GLU. Remove them or use layer_type transformer.")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"'model.n_heads' ({self.n_heads}) must be divisible by 'model.n_kv_heads' ({self.n_kv_heads}).")

    @property
    def uses_qk_norm(self) -> bool:
        """model.qk_norm resolved: its default is on wherever there is attention."""
        return self.layer_type != "hgrn_bit" if self.qk_norm is None else self.qk_norm

    @property
    def widths(self) -> list[int]:
        """Stage widths, outer to inner (one entry for every base but hnet)."""
        return list(self.d_model) if isinstance(self.d_model, list) else [self.d_model]

    @property
    def compression_targets(self) -> list[float]:
        levels = len(self.widths) - 1
        return list(self.target_compression or ([6.0] if levels == 1 else [3.0] * levels))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_hidden(self) -> int:
        if self.d_mlp:
            return self.d_mlp
        if self.mlp == "relu2":
            return 64 * math.ceil(self.hidden_ratio * self.d_model / 64)
        return gated_mlp_hidden(self.d_model, self.hidden_ratio)


def gated_mlp_hidden(width: int, hidden_ratio: float) -> int:
    """Hidden size of a gated (SwiGLU/GLU) MLP: 2/3 of hidden_ratio * width (the same parameters as
    an ungated MLP of that ratio), rounded up to a multiple of 64."""
    return 64 * math.ceil(2 * hidden_ratio * width / 3 / 64)


@dataclass
class DataConfig(Validated):
    section: typing.ClassVar[str] = "data"
    train_files: list[str] = option(None, "Text files (UTF-8; bad bytes are replaced and counted) to train on.", factory=list)
    val_files: list[str] = option(None, "Optional held-out text files; when empty, val_split carves validation out of train_files.", factory=list)
    doc_separator: str | None = option(None, "Splits each file into documents: any string, or eot (<|endoftext|>), blank (a blank line), line (one per line), none; default: one document per file (the same names as `psannlm data build --separator`).")
    tokenizer: str = option("auto", "Tokenizer backend: auto (sentencepiece -> tokenizers -> char), byte, char (alias simple), bpe (from-scratch byte-level BPE, tiktoken engine), sentencepiece, tokenizers.", choices=TOKENIZER_KINDS)
    tokenizer_model_path: str | None = option(None, "Load this tokenizer (.model, tokenizer.json, or a saved tokenizer directory) instead of training one.")
    tokenizer_vocab_size: int | None = option(None, "Vocabulary size when training a subword tokenizer (a soft limit for tiny corpora).", min=8)
    max_length: int = option(256, "Tokens per training window (sequence length).", min=1)
    pack_sequences: bool = option(True, "Pack documents (joined by BOS/EOS) into full windows; false = one document per window, padding masked.")
    val_split: float = option(0.1, "Fraction of documents held out for validation (by seed; a single document is split at its tail).", min=0.0, max=0.9)
    seed: int = option(1337, "Seed for the train/validation split.")
    cache_dir: str | None = option(None, "Where train_files (or sft_files) are built into token shards (default: data/ in the run directory for `psannlm train`, else a temporary directory).")
    path: str | None = option(None, "A built dataset directory (psannlm data build): train on its shards with its saved tokenizer, instead of train_files.")
    sampling: str = option("auto", "How training windows are drawn: shuffle (a seeded permutation per epoch), random (uniform random starts), sequential; auto = random for packed windows (repeated epochs see new window boundaries), shuffle for sft_files and pack_sequences=false (one window per document). random and sequential need packed windows.", choices=("auto", "shuffle", "random", "sequential"))
    bos_aligned: bool = option(False, "Start every training window at a document's BOS (needs sampling random or sequential).")
    train_token_files: list[str] = option(None, "Arrays of token ids (.npy, as `psannlm tokenizer encode` writes them) to train on as one packed stream each, instead of train_files; the tokenizer is data.tokenizer_model_path, or the one saved beside the first array (X.tokenizer/ for X.npy).", factory=list)
    val_token_files: list[str] = option(None, "Held-out arrays of token ids for train_token_files (same tokenizer).", factory=list)
    sft_files: list[str] = option(None, "Supervised fine-tuning: JSONL files of {\"prompt\", \"response\"} or {\"messages\": [{\"role\", \"content\"}, ...]} lines (rendered with the tokenizer's chat template), instead of train_files; the loss covers responses / assistant turns only (diffusion: the rest never masked, answers padded with EOS). With train.init_from the checkpoint's tokenizer is used.", factory=list)

    def check(self) -> None:
        if self.train_token_files or self.val_token_files:
            clash = [k for k in ("train_files", "val_files", "path", "sft_files", "doc_separator") if getattr(self, k)]
            if clash or not self.train_token_files:
                raise ConfigError("'data.train_token_files' is a dataset of its own (with val_token_files); remove "
                                  f"{', '.join('data.' + k for k in clash) or 'val_token_files, or add train_token_files'}.")
        if self.sft_files:
            clash = [k for k in ("train_files", "val_files", "path", "doc_separator") if getattr(self, k)]
            if clash:
                raise ConfigError(f"'data.sft_files' is a dataset of its own; remove {', '.join('data.' + k for k in clash)}.")
        if self.path is not None:
            clash = [k for k in ("train_files", "val_files", "tokenizer_model_path", "tokenizer_vocab_size", "doc_separator")
                     if getattr(self, k)] + (["tokenizer"] if self.tokenizer != "auto" else [])
            if clash:
                raise ConfigError(f"'data.path' trains on a built dataset with its own tokenizer and split; remove "
                                  f"{', '.join('data.' + k for k in clash)} (or drop data.path to train on text files).")
        elif (self.sampling in ("random", "sequential") or self.bos_aligned) and (self.sft_files or not self.pack_sequences):
            raise ConfigError("'data.sampling' random/sequential and 'data.bos_aligned' read windows straight from a "
                              "packed token stream; sft_files and pack_sequences=false make one window per document. "
                              "Use sampling auto/shuffle there.")
        if self.bos_aligned and self.sampling == "shuffle":
            raise ConfigError("'data.bos_aligned' works with sampling random or sequential, not shuffle.")


AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainConfig(Validated):
    section: typing.ClassVar[str] = "train"
    epochs: float = option(1.0, "Passes over the training windows (fractions allowed); ignored when max_steps or max_tokens is set.", min=0.0, min_exclusive=True)
    max_steps: int | None = option(None, "Optimizer steps to run (overrides epochs).", min=1)
    max_tokens: int | None = option(None, "Token budget (overrides epochs; max_steps wins if both are set).", min=1)
    batch_tokens: int = option(16384, "Tokens per optimizer step (windows per step = batch_tokens // max_length).", min=1)
    micro_batch_size: int | None = option(None, "Windows per forward/backward; default derives it from grad_accum_steps or a memory-friendly size.", min=1)
    grad_accum_steps: int | None = option(None, "Micro-batches per optimizer step (default: derived from batch_tokens and micro_batch_size).", min=1)
    lr: float = option(3e-4, "Peak learning rate.", min=0.0, min_exclusive=True)
    min_lr: float | None = option(None, "Final learning rate of the cosine decay (default: lr / 10).", min=0.0)
    warmup_steps: int | None = option(None, "Linear warmup steps (default: 5% of the run, at most 1000).", min=0)
    lr_schedule: str = option("wsd", "Decay after warmup, from lr to min_lr at the last step: cosine, linear, or wsd (warmup-stable-decay: lr held until the last decay_fraction of the steps, then linear to min_lr).", choices=("cosine", "linear", "wsd"))
    decay_fraction: float = option(0.3, "wsd only: the share of the steps, at the end, over which lr falls to min_lr.", min=0.0, max=1.0, min_exclusive=True, only={"lr_schedule": ("wsd",)})
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (never on norms, biases, embeddings or gains).", min=0.0)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas.")
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy loss.", min=0.0, max=1.0)
    grad_clip: float = option(1.0, "Clip the global gradient norm to this value (0 disables).", min=0.0)
    amp: str = option("auto", "Precision: auto (bf16 where it is fast, else fp32), bf16, fp16 (with loss scaling), fp32.", choices=AMP_CHOICES)
    ddp: str = option("auto", "DDP across torchrun processes: auto (on when WORLD_SIZE > 1 and fsdp is off), on, off.", choices=("auto", "on", "off"))
    fsdp: str = option("off", "FSDP2 sharding under torchrun: full_shard (params, grads, optimizer state), shard_grad_op (keep gathered weights from forward to backward), hybrid (shard within a node, replicate across nodes), off.", choices=("off", "full_shard", "shard_grad_op", "hybrid"))
    fsdp_cpu_offload: bool = option(False, "FSDP: keep parameter, gradient and optimizer shards in CPU memory (CUDA only; slower, fits larger models).")
    optimizer: str = option("auto", "auto (muon, or adamw under FSDP; the measured default, docs/results/recipe.md); adamw; zero_adamw (AdamW state sharded across DDP ranks); adamw8bit (bitsandbytes, CUDA; falls back to adamw with a message); adafactor; muon (torch.optim.Muon for the hidden weight matrices, its step RMS matched to AdamW's so train.lr serves both, AdamW for embeddings, head, norms and gains; one process or DDP).", choices=("auto", "adamw", "zero_adamw", "adamw8bit", "adafactor", "muon"))
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
    compile: bool = option(False, "torch.compile each block (falls back to eager with a warning where unsupported).")
    grad_checkpoint: bool = option(False, "Activation checkpointing per block: recompute activations in backward to save memory.")
    auto_micro_batch: bool = option(True, "On CUDA out-of-memory, halve the micro-batch and double grad accumulation (same batch_tokens), and say so.")
    peak_tflops: float | None = option(None, "Peak TFLOP/s of one device for MFU (default: the built-in table of GPUs, or a CPU estimate).", min=0.0, min_exclusive=True)
    seed: int = option(1337, "Seed for initialisation, data order and dropout.")
    checkpoint_dir: str | None = option(None, "Run directory for checkpoints, metrics and plots (default: runs/<timestamp>).")
    resume_from: str | None = option(None, "Checkpoint directory to resume from (exact continuation), or 'latest' in checkpoint_dir.")
    init_from: str | None = option(None, "Checkpoint directory whose weights start a new run (fresh optimizer and schedule); a causal checkpoint may start a diffusion model (model.objective=diffusion, best with model.shift_logits), its mask token's embedding the mean of the others.")
    attention_anneal_steps: int = option(0, "diffusion only: open the attention from causal to bidirectional over the first N steps (each query sees a random share step/N of the later positions; DiffuLLaMA's mask annealing), for a denoiser started from a causal checkpoint (train.init_from); 0: bidirectional from the start.", min=0)
    log_interval_steps: int = option(10, "Steps between metric log lines.", min=1)
    log_norms: bool = option(False, "Also log, at each log step, the weights' global L2 norm (weight_l2_norm) and the RMS of each block's output in that step's last training forward (act_rms.<block>), averaged over ranks.")
    eval_interval_steps: int = option(200, "Steps between validation runs (0: only at the end).", min=0)
    eval_batches: int | None = option(None, "Cap on validation micro-batches per evaluation (default: the whole validation set).", min=1)
    eval_mc_draws: int = option(4, "diffusion models: Monte-Carlo draws per sequence of the validation NELBO (val_loss is that bound).", min=1)
    max_bad_steps: int = option(10, "Steps in a row with a non-finite loss or gradient norm (each skipped: no update) before the run stops with an error.", min=1)
    save_interval_steps: int = option(0, "Steps between checkpoints (0: only best and final).", min=0)
    async_checkpoint: bool = option(False, "FSDP: write sharded step checkpoints in the background (torch.distributed.checkpoint.async_save).")
    progress: bool = option(True, "Show a progress bar (loss, lr, tok/s, ETA).")
    plot: bool = option(True, "Write loss_curve.png at the end of the run from metrics.jsonl (needs jsonl in loggers, and matplotlib: pip install psann-lm[viz]).")
    loggers: list[str] = option(None, "Where metrics go (rank 0 only), any of: console (a line per log interval and evaluation; the bar is `progress`), json (the same records as JSON lines on stdout, values under metrics, grad_norm also as grad_l2_norm: the diffusionlm console format, for jq), jsonl (metrics.jsonl), csv (metrics.csv, a column per metric), tensorboard (event files in the run directory's tensorboard/; pip install 'psann-lm[tensorboard]'), wandb (a Weights & Biases run with the config, files in the run directory's wandb/; pip install 'psann-lm[wandb]').", factory=lambda: ["console", "jsonl", "csv"])
    wandb_project: str = option("psann-lm", "wandb only: the W&B project.")
    wandb_run_name: str | None = option(None, "wandb only: the W&B run name (default: the run directory's name).")
    wandb_entity: str | None = option(None, "wandb only: the W&B entity (user or team) the run belongs to (default: your W&B default).")
    wandb_artifacts: bool = option(False, "wandb only: when training ends, log the final and best checkpoints (type model) and the tokenizer files (type tokenizer) as W&B artifacts.")
    wandb_mode: str = option("offline", "wandb only: offline (files only, no network; upload later with `wandb sync`), online, or disabled (W&B does nothing).", choices=WANDB_MODES)

    WANDB_ONLY: typing.ClassVar[tuple] = ("wandb_project", "wandb_run_name", "wandb_entity", "wandb_mode", "wandb_artifacts")

    def check(self) -> None:
        check_logger_names(self.loggers)
        changed = self.changed(self.WANDB_ONLY)
        if changed and "wandb" not in self.loggers:
            raise ConfigError(f"'train.{changed[0]}' only applies to the wandb logger, which train.loggers leaves out; "
                              "remove it or add wandb to train.loggers.")
        if self.plot and "jsonl" not in self.loggers:
            raise ConfigError("'train.plot' draws loss_curve.png from metrics.jsonl, which train.loggers leaves out; "
                              "add jsonl to train.loggers or set train.plot=false.")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"'train.min_lr' ({self.min_lr}) must not exceed 'train.lr' ({self.lr}).")
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"'train.betas' must lie in [0, 1), got {list(self.betas)}.")


@dataclass
class GenerateConfig(Validated):
    section: typing.ClassVar[str] = "generate"
    max_new_tokens: int = option(64, "Tokens to generate after the prompt.", min=0)
    temperature: float = option(1.0, "Sampling temperature (0 = greedy).", min=0.0)
    top_k: int | None = option(None, "Keep only the k most likely tokens.", min=1, only={"objective": ("causal",)})
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest set whose probability reaches p (1 disables).", min=0.0, max=1.0, min_exclusive=True, only={"objective": ("causal",)})
    repetition_penalty: float = option(1.0, "CTRL penalty for tokens already present (>1 discourages repeats).", min=0.0, min_exclusive=True, only={"objective": ("causal",)})
    stop: list[str] = option(None, "Stop when any of these strings appears in the generated text.", factory=list)
    seed: int | None = option(None, "Sampling seed (default: nondeterministic).")
    steps: int | None = option(None, "diffusion models: denoising steps in all (default: max_new_tokens, one token per step).", min=1, only={"objective": ("diffusion",)})
    block_length: int | None = option(None, "diffusion models: tokens per semi-autoregressive block; must divide max_new_tokens (default: one block).", min=1, only={"objective": ("diffusion",)})
    remasking: str = option("low_confidence", "diffusion models: which masked positions a step commits: low_confidence (most probable first) or random.", choices=("low_confidence", "random"), only={"objective": ("diffusion",)})
    cfg_scale: float = option(0.0, "diffusion models: classifier-free guidance scale w (logits = u + (w + 1)(c - u), prompt masked for u); 0 is off.", min=0.0, only={"objective": ("diffusion",)})
    suppress_eos: bool = option(False, "diffusion models: never sample EOS (fills all max_new_tokens).", only={"objective": ("diffusion",)})

    def check(self) -> None:
        if any(s == "" for s in self.stop):
            raise ConfigError("'generate.stop' holds an empty string, which would end every reply at once; remove it.")

    def check_objective(self, objective: str) -> None:
        """Options of the other objective's sampler are errors, not silently ignored."""
        for f, _ in self.misplaced(objective=objective):
            own = [g.name for g in dataclasses.fields(self) if objective in g.metadata["only"].get("objective", ())]
            raise ConfigError(f"'generate.{f.name}' does not apply to a {objective} model's sampler; remove it. "
                              f"(Its sampler takes {', '.join(own)}.)")


SECTIONS: dict[str, type[Validated]] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "generate": GenerateConfig,
}


@dataclass
class RunConfig:
    """A whole run: what `psannlm train --config` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    # "section.key" of every key the config file and overrides set (defaults are not in it)
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping with sections {', '.join(SECTIONS)}; got {type(values).__name__}.")
        for name in values:
            if name not in SECTIONS:
                raise ConfigError(f"unknown config section '{name}'.{did_you_mean(name, SECTIONS)} "
                                  f"Valid sections: {', '.join(SECTIONS)}.")
        given = frozenset(f"{name}.{key}" for name, keys in values.items() if isinstance(keys, dict) for key in keys)
        return cls(**{name: SECTIONS[name].from_dict(values.get(name) or {}) for name in SECTIONS}, given=given)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON file into a plain dict (no validation)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}. Check the path (examples live in examples/lm/configs/).")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, expected a .yaml, .toml or .json file: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text) or {}
    except Exception as exc:  # parse errors of any of the three libraries
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    raise ConfigError(f"unsupported config format '{suffix}' ({path}); use .yaml, .yml, .toml or .json.")


# The seed's JSON model files ({"model_type": "hnet_bit", "d_model": [...], ...}): key -> model key.
SEED_MODEL_KEYS = {"vocab_size": "vocab_size", "d_model": "d_model", "hidden_size": "d_model", "num_blocks": "num_blocks",
                   "num_hidden_layers": "n_layers", "num_heads": "n_heads", "expand_ratio": "expand_ratio",
                   "hidden_ratio": "hidden_ratio", "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps",
                   "tie_word_embeddings": "tie_embeddings"}
SEED_MODEL_TYPES = {"hnet_bit": ("hnet", "hgrn_bit"), "hnet": ("hnet", "transformer"), "hgrn_bit": ("byte", "hgrn_bit"),
                    "simplified_slm": ("byte", "hgrn_bit"), "slm": ("byte", "hgrn_bit")}
# Kernel choices of the seed's GPU code; every value computes the same recurrence here.
SEED_ATTN_MODES = ("fused_recurrent", "chunk", "naive")


def seed_model_config(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A seed-style JSON model config -> our model section (unknown keys are errors)."""
    kind = values.get("model_type")
    if kind not in SEED_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {kind!r} is not one of {', '.join(SEED_MODEL_TYPES)}.")
    base, layer_type = SEED_MODEL_TYPES[kind]
    model: dict[str, Any] = {"base": base, "layer_type": layer_type}
    for key, value in values.items():
        if key == "model_type":
            continue
        if key == "attn_mode":
            if value not in SEED_ATTN_MODES:
                raise ConfigError(f"{source}: attn_mode {value!r} is not one of {', '.join(SEED_ATTN_MODES)}.")
            continue
        if key not in SEED_MODEL_KEYS:
            raise ConfigError(f"{source}: unknown key '{key}' in a {kind} model config.{did_you_mean(key, SEED_MODEL_KEYS)} "
                              f"Valid keys: model_type, attn_mode, {', '.join(SEED_MODEL_KEYS)}.")
        model[SEED_MODEL_KEYS[key]] = value
    if model.get("vocab_size", 256) != 256:
        raise ConfigError(f"{source}: byte-level models have vocab_size 256, got {model['vocab_size']}.")
    return model


def apply_override(values: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` (or `section.key.sub=value` inside a mapping) to a raw config dict."""
    text = override[2:] if override.startswith("--") else override
    if "=" not in text:
        raise ConfigError(f"override '{override}' must look like --section.key=value (e.g. --train.lr=3e-4).")
    dotted, raw = text.split("=", 1)
    parts = dotted.split(".")
    if len(parts) < 2:
        raise ConfigError(f"override '{override}' needs a section, e.g. --train.{parts[0]}=... "
                          f"(sections: {', '.join(SECTIONS)}).")
    section, key, *rest = parts
    if section not in SECTIONS:
        raise ConfigError(f"override '{override}': unknown section '{section}'.{did_you_mean(section, SECTIONS)}")
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in names:
        raise ConfigError(f"override '{override}': unknown key '{section}.{key}'.{did_you_mean(key, names)}")
    target = values.setdefault(section, {})
    if rest:  # nested key inside a mapping field such as model.sine_params
        target = target.setdefault(key, None) or {}
        values[section][key] = target
        for part in rest[:-1]:
            target = target.setdefault(part, {})
        target[rest[-1]] = yaml.safe_load(raw) if raw else raw
    else:
        target[key] = raw  # typed by the field's own coercion


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """File (optional) + command-line overrides -> validated RunConfig."""
    values = read_config_file(path) if path else {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections {', '.join(SECTIONS)}.")
    if "model_type" in values:  # a seed-style model file: it is the model section
        values = {"model": seed_model_config(values, str(path))}
    for override in overrides:
        apply_override(values, override)
    return RunConfig.from_dict(values)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def config_keys() -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(section, field, default) of every config key, in the order of the sections and fields:
    the same metadata the validation reads, for the README's table and `--help`."""
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield name, f, (f.default if f.default is not dataclasses.MISSING else f.default_factory())


def config_reference_markdown() -> str:
    """The config reference table of the README, generated from the field metadata."""
    lines, section = [], None
    for name, f, default in config_keys():
        if name != section:
            lines += ([""] if section else []) + [f"**`{name}`**", "", "| key | default | meaning |", "|---|---|---|"]
            section = name
        meaning = f.metadata["help"].replace("|", "\\|")  # a bare | would end the table cell
        lines.append(f"| `{f.name}` | `{json.dumps(plain(default))}` | {meaning} |")
    lines.append("")
    return "\n".join(lines)


def config_keys_help() -> str:
    """Every config key as `--section.key TYPE (default D): its first sentence`, for --help."""
    lines = ["config keys (override any as --section.key=value or --section.key value; the README's config "
             "reference has each in full):"]
    for name, f, default in config_keys():
        text = f.metadata["help"]
        if len(text) > 110:
            text = text[:text.rfind(" ", 0, 107)] + " ..."
        lines.append(f"  --{name}.{f.name}  {f.type} (default {json.dumps(plain(default))}): {text}")
    return "\n".join(lines)
