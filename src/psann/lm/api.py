"""The two public classes: `psannLMDataPrep` (text -> tokenizer -> windows) and `psannLM` (model facade)."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .config import DataConfig, GenerateConfig, ModelConfig, RunConfig, TrainConfig
from .data.loader import TokenWindows, WindowLoader
from .data.text import iter_documents
from .data.tokens import encode_corpus, split_documents_for_validation
from .errors import ConfigError, DataError
from .infer.generate import generate_tokens
from .models import build_model, check_base, count_parameters
from .tokenizers import build_tokenizer, tokenizer_fingerprint
from .train import checkpoint as ckpt
from .train.trainer import Trainer, resolve_device

log = logging.getLogger("psann.lm")
SMALL_DATA_WINDOWS = 8


class psannLMDataPrep:
    """Documents -> trained (or loaded) tokenizer -> train/validation token windows.

    `texts` are strings or file paths. The split is by document (seeded); the tokenizer is trained
    on the training documents only. File corpora are tokenised into memmaps under `cache_dir`.
    """

    def __init__(self, texts: str | os.PathLike | Iterable[str | os.PathLike], tokenizer: str = "auto",
                 tokenizer_model_path: str | None = None, max_length: int = 256, pack_sequences: bool = True,
                 val_split: float = 0.1, seed: int = 1337, *, vocab_size: int | None = None,
                 doc_separator: str | None = None, val_texts: Iterable[str | os.PathLike] | None = None,
                 cache_dir: str | None = None):
        self.config = DataConfig(tokenizer=tokenizer, tokenizer_model_path=tokenizer_model_path,
                                 tokenizer_vocab_size=vocab_size, max_length=max_length, pack_sequences=pack_sequences,
                                 val_split=val_split, seed=seed, doc_separator=doc_separator, cache_dir=cache_dir)
        items = [texts] if isinstance(texts, (str, os.PathLike)) else list(texts)
        if not items:
            raise DataError("psannLMDataPrep got no texts: pass a list of strings or file paths.")
        self._from_files = any(isinstance(i, os.PathLike) or (isinstance(i, str) and os.path.isfile(i)) for i in items)
        if self._from_files:  # record them so a saved checkpoint can say what it was trained on
            self.config.train_files = [str(i) for i in items if isinstance(i, os.PathLike) or os.path.isfile(str(i))]
        docs = list(iter_documents(items, doc_separator))
        if val_texts is not None:
            train_docs, val_docs = docs, list(iter_documents(val_texts, doc_separator))
        else:
            train_docs, val_docs = split_documents_for_validation(docs, val_split, seed)
            del docs  # one copy fewer of a huge document while it is encoded
        if not train_docs:
            raise DataError("no training text: every document is empty. Pass non-empty strings or files.")
        self.tokenizer = build_tokenizer(tokenizer, train_docs, vocab_size=vocab_size, model_path=tokenizer_model_path)
        cache = None
        if self._from_files:
            cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="psann-data-"))
        self.train_corpus = encode_corpus(train_docs, self.tokenizer, cache / "train.bin" if cache else None)
        self.val_corpus = encode_corpus(val_docs, self.tokenizer, cache / "val.bin" if cache else None) if val_docs else None
        pad = self.tokenizer.pad_id
        self.train_windows = TokenWindows(self.train_corpus, max_length, pack_sequences, pad)
        self.val_windows = TokenWindows(self.val_corpus, max_length, pack_sequences, pad) if self.val_corpus else None
        if len(self.train_windows) == 0:
            raise DataError("the training text is too short to make one window (it needs at least 2 tokens).")
        if len(self.train_windows) < SMALL_DATA_WINDOWS:
            log.warning("data: very small corpus: %d training window(s), %d target tokens; the model will memorise "
                        "rather than learn. Add text for a meaningful run.", len(self.train_windows),
                        self.train_windows.n_target_tokens)
        log.info("data: %d train docs -> %s tokens, %d windows of %d; %d validation docs; tokenizer %s (vocab %d)",
                 len(train_docs), f"{self.train_corpus.n_tokens:,}", len(self.train_windows), max_length,
                 len(val_docs), self.tokenizer.kind, self.tokenizer.vocab_size)

    @classmethod
    def from_built(cls, path: str | os.PathLike, max_length: int = 256, *, sampling: str = "auto",
                   bos_aligned: bool = False, seed: int = 1337) -> "psannLMDataPrep":
        """Train on a dataset made by `psannlm data build` (its shards, split and saved tokenizer)."""
        from .data.shards import ShardedTokens, ShardWindows
        from .tokenizers import load_tokenizer

        self = cls.__new__(cls)
        self.config = DataConfig(path=str(path), max_length=max_length, sampling=sampling, bos_aligned=bos_aligned,
                                 seed=seed)
        self.tokenizer = load_tokenizer(Path(path) / "tokenizer")
        train = ShardedTokens(path, "train", expected_fingerprint=tokenizer_fingerprint(self.tokenizer))
        val = ShardedTokens(path, "val")
        self.train_windows = ShardWindows(train, max_length)
        self.val_windows = ShardWindows(val, max_length) if val.n_tokens >= 2 else None
        if len(self.train_windows) == 0:
            raise DataError(f"{path}: the training shards hold fewer than 2 tokens.")
        log.info("data: %s (%s train tokens in %d shard(s), %s val tokens); sampling %s%s", path,
                 f"{train.n_tokens:,}", len(train.shards), f"{val.n_tokens:,}", self.sampling,
                 ", BOS-aligned" if bos_aligned else "")
        return self

    @classmethod
    def from_sft(cls, paths: Sequence[str | os.PathLike], tokenizer: str = "auto", tokenizer_model_path: str | None = None,
                 max_length: int = 256, val_split: float = 0.1, seed: int = 1337, *, vocab_size: int | None = None,
                 objective: str = "causal") -> "psannLMDataPrep":
        """Supervised fine-tuning on JSONL prompt/response pairs or chat conversations (see data/sft.py):
        the loss covers the answers (assistant turns, rendered with the tokenizer's chat template); for
        objective "diffusion" answers are padded with EOS and the rest is never masked. Fine-tuning a
        checkpoint: tokenizer_model_path=<checkpoint>/tokenizer."""
        from .data.sft import SFTWindows, encode_example, example_text, read_sft_jsonl

        examples = read_sft_jsonl(list(paths))
        order = np.random.default_rng(seed).permutation(len(examples))
        n_val = int(round(val_split * len(examples))) if len(examples) > 1 else 0
        val_examples, train_examples = [examples[i] for i in order[:n_val]], [examples[i] for i in order[n_val:]]
        self = cls.__new__(cls)
        self.config = DataConfig(sft_files=[str(p) for p in paths], tokenizer=tokenizer,
                                 tokenizer_model_path=tokenizer_model_path, tokenizer_vocab_size=vocab_size,
                                 max_length=max_length, val_split=val_split, seed=seed)
        self.tokenizer = build_tokenizer(tokenizer, [example_text(e) for e in train_examples], vocab_size=vocab_size,
                                         model_path=tokenizer_model_path)
        tok = self.tokenizer

        def windows(subset):
            return SFTWindows([encode_example(tok, e) for e in subset], max_length, tok.pad_id, tok.eos_id,
                              eos_padding=objective == "diffusion")

        self.train_windows = windows(train_examples)
        self.val_windows = windows(val_examples) if val_examples else None
        if self.train_windows.skipped:
            log.warning("data: %d SFT example(s) dropped: no answer token fits in max_length=%d tokens.",
                        self.train_windows.skipped, max_length)
        log.info("data: %d SFT examples for training, %d for validation (%s answer tokens); tokenizer %s (vocab %d)",
                 len(self.train_windows), len(val_examples), f"{self.train_windows.n_target_tokens:,}", tok.kind,
                 tok.vocab_size)
        return self

    @property
    def sampling(self) -> str:
        if self.config.sampling != "auto":
            return self.config.sampling
        return "random" if self.config.path else "shuffle"

    def make_loader(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        """The training loader (state_dict/load_state_dict resume exactly)."""
        if self.sampling == "shuffle":
            return WindowLoader(self.train_windows, batch_size, seed=seed, rank=rank, world_size=world_size)
        from .data.shards import ShardLoader

        return ShardLoader(self.train_windows.data, self.max_length, batch_size, seed=seed, mode=self.sampling,
                           bos_aligned=self.config.bos_aligned, rank=rank, world_size=world_size)

    @classmethod
    def from_config(cls, config: DataConfig, objective: str = "causal") -> "psannLMDataPrep":
        if config.sft_files:
            return cls.from_sft(config.sft_files, config.tokenizer, config.tokenizer_model_path, config.max_length,
                                config.val_split, config.seed, vocab_size=config.tokenizer_vocab_size,
                                objective=objective)
        if config.path:
            return cls.from_built(config.path, config.max_length, sampling=config.sampling,
                                  bos_aligned=config.bos_aligned, seed=config.seed)
        if not config.train_files:
            raise ConfigError("'data.train_files' is empty: list at least one text file to train on.")
        return cls(config.train_files, config.tokenizer, config.tokenizer_model_path, config.max_length,
                   config.pack_sequences, config.val_split, config.seed, vocab_size=config.tokenizer_vocab_size,
                   doc_separator=config.doc_separator, val_texts=config.val_files or None, cache_dir=config.cache_dir)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def max_length(self) -> int:
        return self.config.max_length


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
        check_base(base)
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
        if not isinstance(dp, psannLMDataPrep):
            raise DataError(f"fit() needs a psannLMDataPrep, got {type(dp).__name__}.")
        TrainConfig.check_keys(train_kwargs)
        train_cfg = TrainConfig(epochs=epochs, batch_tokens=batch_tokens, lr=lr, amp=amp, **train_kwargs)
        if self.model is None:
            self._build(dp.tokenizer, dp.max_length, train_cfg.seed)
        elif self.tokenizer is not dp.tokenizer and tokenizer_fingerprint(self.tokenizer) != tokenizer_fingerprint(dp.tokenizer):
            raise DataError("this model was built for another tokenizer; prepare the data with the model's "
                            "tokenizer (tokenizer_model_path=<checkpoint>/tokenizer).")
        self.run_config = RunConfig(model=self.model_config, data=dp.config, train=train_cfg,
                                    generate=self.generate_config)
        trainer = Trainer(self.model, self.tokenizer, self.run_config, dp.train_windows, dp.val_windows,
                          make_loader=dp.make_loader)
        self.last_run = trainer.fit()
        if trainer.mode == "fsdp":  # the shards went with the process group: reload the consolidated weights
            self.model = ckpt.load_checkpoint(self.last_run["final_checkpoint"], trainer.device)[0]
        return self

    def _build(self, tokenizer, max_length: int, seed: int) -> None:
        cfg = self.model_config
        vocab = cfg.vocab_size or tokenizer.vocab_size
        if vocab < tokenizer.vocab_size:
            raise ConfigError(f"vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
                              "use vocab_size=dp.vocab_size (or leave it unset).")
        if cfg.objective == "diffusion":  # the mask token: one id after the tokenizer's (or the one asked for)
            mask_id = cfg.mask_token_id if cfg.mask_token_id is not None else tokenizer.vocab_size
            if mask_id in tokenizer.special_ids():
                raise ConfigError(f"mask_token_id={mask_id} is the tokenizer's pad/bos/eos/unk id; leave it unset to "
                                  "append a mask token after the vocabulary.")
            vocab = max(vocab, mask_id + 1)
            cfg = dataclasses.replace(cfg, mask_token_id=mask_id)
        self.model_config = dataclasses.replace(cfg, vocab_size=vocab, max_seq_len=cfg.max_seq_len or max_length)
        torch.manual_seed(seed)
        self.model = build_model(self.model_config)
        self.tokenizer = tokenizer
        log.info("model: %s, %s parameters", self.model_config.base, f"{count_parameters(self.model):,}")

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
        from .tokenizers.chat import encode_conversation

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
        """Text generated after each token-id prompt. A row ends at EOS, at any of `stop_ids` (not
        included) or at a `gen.stop` string (cut); `on_text(row, text_so_far)` streams causal rows."""
        tok = self.tokenizer
        if self.model_config.objective == "diffusion":
            texts = self._diffusion_generate(encoded, gen, stop_ids)
            for row, text in enumerate(texts if on_text else ()):
                on_text(row, text)
            return texts

        def should_stop(row: int, new_ids: list[int]) -> bool:
            if new_ids[-1] in stop_ids:
                return True
            text = tok.decode(new_ids)
            if on_text is not None:
                on_text(row, text)
            return any(s in text for s in gen.stop)

        watch = bool(gen.stop or stop_ids or on_text)
        new = generate_tokens(self.model, encoded, gen, eos_id=tok.eos_id, pad_id=tok.pad_id,
                              max_seq_len=self.model_config.max_seq_len, should_stop=should_stop if watch else None)
        return [_cut_at_stop(tok.decode(_cut_at_ids(ids, stop_ids)), gen.stop) for ids in new]

    def _diffusion_generate(self, encoded: list[list[int]], gen: GenerateConfig, stop_ids: set[int]) -> list[str]:
        from .infer.diffusion import diffusion_generate

        tok, cfg = self.tokenizer, self.model_config
        if gen.max_new_tokens == 0:
            return [""] * len(encoded)
        if gen.max_new_tokens >= cfg.max_seq_len:
            raise ConfigError(f"max_new_tokens={gen.max_new_tokens} leaves no room for the prompt in this model's "
                              f"{cfg.max_seq_len}-token context; ask for fewer tokens.")
        keep = cfg.max_seq_len - gen.max_new_tokens  # the prompt and the canvas share the context
        new = diffusion_generate(self.model, [p[-keep:] for p in encoded], mask_id=cfg.mask_token_id,
                                 gen_length=gen.max_new_tokens, block_length=gen.block_length, steps=gen.steps,
                                 temperature=gen.temperature, remasking=gen.remasking, cfg_scale=gen.cfg_scale,
                                 suppress_ids=[tok.eos_id] if gen.suppress_eos else [], pad_id=tok.pad_id,
                                 eos_id=tok.eos_id, seed=gen.seed)
        return [_cut_at_stop(tok.decode(_cut_at_ids(ids, stop_ids)), gen.stop) for ids in new]

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


def _cut_at_ids(ids: list[int], stop_ids: set[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stop_ids), ids)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]
