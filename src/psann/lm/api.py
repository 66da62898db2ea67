"""The two public classes: `psannLMDataPrep` (text -> tokenizer -> windows) and `psannLM` (model facade)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .config import DataConfig, GenerateConfig, ModelConfig, RunConfig, TrainConfig
from .data.prepare import PreparedData, prepare_data
from .errors import ConfigError, DataError, unknown_choice
from .infer.generate import generate_text
from .models import check_model_config, count_parameters
from .objectives import OBJECTIVES, objective_for
from .tokenizers import tokenizer_fingerprint
from .tokenizers.chat import encode_conversation
from .train import checkpoint as ckpt
from .train.run import train
from .train.trainer import resolve_device

class psannLMDataPrep(PreparedData):
    """Documents -> trained (or loaded) tokenizer -> train/validation token windows.

    `texts` are strings or file paths. The split is by document (seeded); the tokenizer is trained
    on the training documents only. The documents are built into token shards under `cache_dir`
    (default: a temporary directory). `config` instead prepares what a DataConfig names (the
    classmethods below use it).
    """

    def __init__(self, texts: str | os.PathLike | Iterable[str | os.PathLike] | None = None, tokenizer: str = "auto",
                 tokenizer_model_path: str | None = None, max_length: int = 256, pack_sequences: bool = True,
                 val_split: float = 0.1, seed: int = 1337, *, vocab_size: int | None = None,
                 doc_separator: str | None = None, val_texts: Iterable[str | os.PathLike] | None = None,
                 cache_dir: str | None = None, sampling: str = "auto", config: DataConfig | None = None,
                 objective: str = "causal"):
        if (texts is None) == (config is None):
            raise DataError("psannLMDataPrep needs texts (a list of strings or file paths) or a DataConfig, not both.")
        if config is None:
            config = DataConfig(tokenizer=tokenizer, tokenizer_model_path=tokenizer_model_path,
                                tokenizer_vocab_size=vocab_size, max_length=max_length, pack_sequences=pack_sequences,
                                val_split=val_split, seed=seed, doc_separator=doc_separator, cache_dir=cache_dir,
                                sampling=sampling)
        if objective not in OBJECTIVES:
            raise ConfigError(unknown_choice("objective", objective, OBJECTIVES))
        prepared = prepare_data(config, texts, val_texts, eos_padded_answers=OBJECTIVES[objective].eos_padded_answers)
        super().__init__(prepared.config, prepared.tokenizer, prepared.train_windows, prepared.val_windows)

    @classmethod
    def from_built(cls, path: str | os.PathLike, max_length: int = 256, *, sampling: str = "auto",
                   bos_aligned: bool = False, seed: int = 1337) -> "psannLMDataPrep":
        """Train on a dataset made by `psannlm data build` (its shards, split and saved tokenizer)."""
        return cls(config=DataConfig(path=str(path), max_length=max_length, sampling=sampling,
                                     bos_aligned=bos_aligned, seed=seed))

    @classmethod
    def from_sft(cls, paths: Sequence[str | os.PathLike], tokenizer: str = "auto", tokenizer_model_path: str | None = None,
                 max_length: int = 256, val_split: float = 0.1, seed: int = 1337, *, vocab_size: int | None = None,
                 objective: str = "causal") -> "psannLMDataPrep":
        """Supervised fine-tuning on JSONL prompt/response pairs or chat conversations (see data/sft.py):
        the loss covers the answers (assistant turns, rendered with the tokenizer's chat template); for
        objective "diffusion" answers are padded with EOS and the rest is never masked. Fine-tuning a
        checkpoint: tokenizer_model_path=<checkpoint>/tokenizer."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        return cls(config=DataConfig(sft_files=[str(p) for p in paths], tokenizer=tokenizer,
                                     tokenizer_model_path=tokenizer_model_path, tokenizer_vocab_size=vocab_size,
                                     max_length=max_length, val_split=val_split, seed=seed), objective=objective)

    @classmethod
    def from_config(cls, config: DataConfig, objective: str = "causal") -> "psannLMDataPrep":
        return cls(config=config, objective=objective)


class psannLM:
    """A language model you can fit, generate with, save and load.

    Constructor arguments are ModelConfig fields (base, d_model, n_layers, n_heads, d_mlp, vocab_size,
    rope, sine_params, ...). The network is built at `fit` (or `load`) once the vocabulary is known.
    """

    def __init__(self, base: str = "transformer", d_model: int = 512, n_layers: int = 8, n_heads: int = 8,
                 vocab_size: int | None = None, rope: bool = True, sine_params: dict | None = None, **model_kwargs):
        ModelConfig.check_keys(model_kwargs)
        self.model_config = ModelConfig(base=base, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                        vocab_size=vocab_size, rope=rope, sine_params=sine_params, **model_kwargs)
        check_model_config(self.model_config)
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.run_config: RunConfig | None = None
        self.generate_config = GenerateConfig()  # defaults for generate(); saved with the model
        self.last_run: dict | None = None

    # -- training ------------------------------------------------------------------------------
    def fit(self, dp: psannLMDataPrep, epochs: float = 1, batch_tokens: int = 16384, lr: float = 3e-4,
            amp: str = "auto", **train_kwargs) -> "psannLM":
        """Train on `dp`; every TrainConfig key is accepted (warmup_steps, max_steps, checkpoint_dir, ...).

        Writes checkpoints and metrics under `checkpoint_dir`, default runs/<timestamp>.
        """
        if not isinstance(dp, PreparedData):
            raise DataError(f"fit() needs a psannLMDataPrep, got {type(dp).__name__}.")
        TrainConfig.check_keys(train_kwargs)
        train_cfg = TrainConfig(epochs=epochs, batch_tokens=batch_tokens, lr=lr, amp=amp, **train_kwargs)
        if self.model is not None and self.tokenizer is not dp.tokenizer and \
                tokenizer_fingerprint(self.tokenizer) != tokenizer_fingerprint(dp.tokenizer):
            raise DataError("this model was built for another tokenizer; prepare the data with the model's "
                            "tokenizer (tokenizer_model_path=<checkpoint>/tokenizer).")
        config = RunConfig(model=self.model_config, data=dp.config, train=train_cfg, generate=self.generate_config)
        run = train(config, data=dp, model=self.model)
        self.run_config, self.model_config, self.tokenizer = run.config, run.config.model, run.tokenizer
        self.model = run.model or ckpt.load_checkpoint(run.info["final_checkpoint"], resolve_device(train_cfg.device))[0]
        self.last_run = run.info
        return self

    # -- generation ----------------------------------------------------------------------------
    def _require_model(self) -> None:
        if self.model is None:
            raise RuntimeError("this psannLM has no weights yet: call fit(dp, ...) or psannLM.load(path) first.")

    def generate(self, prompt: str, **options) -> str:
        """Continue `prompt`. Options: max_new_tokens, temperature (0 = greedy), top_k, top_p,
        repetition_penalty, stop (list of strings), seed."""
        return self.generate_batch([prompt], **options)[0]

    def generate_batch(self, prompts: Sequence[str], **options) -> list[str]:
        """Continue several prompts at once (left-padded); each row equals its single-prompt result."""
        if isinstance(prompts, str):
            raise TypeError("generate_batch takes a list of prompts; use generate() for one string.")
        self._require_model()
        tok = self.tokenizer
        encoded = [tok.encode(p, add_bos=True) for p in prompts]  # BOS only: a prompt never ends in EOS
        return self.complete_ids(encoded, self.generation_settings(**options))

    def chat(self, messages: Sequence[dict], **options) -> str:
        """The assistant's reply to a conversation ``[{"role": "user", "content": ...}, ...]``, rendered
        with the tokenizer's chat template; the reply ends at the end-of-turn token or EOS."""
        self._require_model()
        prompt, _ = encode_conversation(self.tokenizer, messages, add_generation_prompt=True)
        return self.complete_ids([prompt], self.generation_settings(**options), stop_ids=self.tokenizer.chat_stop_ids)[0]

    def generation_settings(self, **options) -> GenerateConfig:
        """The saved generation defaults with `options` applied, checked against the model's objective."""
        GenerateConfig.check_keys(options)
        gen = GenerateConfig(**{**self.generate_config.to_dict(), **options})
        gen.check_objective(self.model_config.objective)
        return gen

    def complete_ids(self, encoded: list[list[int]], gen: GenerateConfig, *, stop_ids: set[int] = frozenset(),
                     on_text: Callable[[int, str], None] | None = None) -> list[str]:
        """Text generated after each token-id prompt (see infer.generate.generate_text)."""
        return generate_text(self.model, self.tokenizer, objective_for(self.model_config), encoded, gen,
                             stop_ids=stop_ids, on_text=on_text)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write weights, config and tokenizer to directory `path` (load with psannLM.load)."""
        self._require_model()
        config = self.run_config or RunConfig()
        config = dataclasses.replace(config, model=self.model_config, generate=self.generate_config)
        return ckpt.save_checkpoint(path, self.model, self.tokenizer, config)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "psannLM":
        model, tokenizer, config = ckpt.load_checkpoint(path, resolve_device(device, "device"))
        self = cls.__new__(cls)
        self.model_config, self.model, self.tokenizer, self.run_config = config.model, model, tokenizer, config
        self.generate_config, self.last_run = config.generate, None
        return self

    def num_parameters(self) -> int:
        self._require_model()
        return count_parameters(self.model)

