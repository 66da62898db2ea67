"""The lm-eval adapter: `--model psann --model_args ckpt=DIR[,device=..,batch_size=..,max_length=..,mc_draws=..]`.

Importing this module registers the model with lm-eval; `main` (`psannlm eval harness`,
scripts/run_lm_eval_psann.py) does that and then runs lm-eval's own CLI, so every lm-eval flag
works (spelled with dashes or underscores), plus --ckpt, and --mc-file / --ppl-file NAME=PATH for
offline tasks over local JSONL files (see tasks.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
except ImportError as exc:  # an optional extra
    raise ImportError("the lm-eval harness needs the 'eval' extra: pip install 'psann-lm[eval]'") from exc

from ..config import GenerateConfig
from ..console import setup_logging
from ..infer.generate import generate_text
from ..objectives import objective_for
from ..train.checkpoint import load_checkpoint
from ..train.exports import load_exported
from ..train.trainer import resolve_device
from ..errors import ConfigError, unknown_choice
from ..tokenizers import build_tokenizer, tokenizer_fingerprint
from ..tokenizers.hf import SPECIAL_MAP_FILE, hub_file
from .loglik import Scorer
from .tasks import offline_env, write_task_dir

log = logging.getLogger("psann.lm")
GENERATE_OPTIONS = {f.name for f in dataclasses.fields(GenerateConfig)} - {"max_new_tokens", "temperature", "stop"}
# The 3B plan's `--model custom --model_args custom_model_class=psann_adapter.PSANNLM,...` names this class so.
CUSTOM_CLASSES = ("psann_adapter.PSANNLM", "psann.lm.eval.harness.PsannLM")
SOURCE_ARGS = ("custom_model_class", "hf_repo", "hf_filename", "tokenizer_backend", "tokenizer_model_path",
               "tokenizer_special_map_path")


def _batch_size(value) -> int | str:
    if str(value) == "auto":
        return "auto"  # searched once the model is loaded
    if str(value).startswith("auto:"):
        raise ConfigError(f"batch_size={value}: searching again during the run is not supported; use auto (one "
                          "search, at the longest windows, which come first) or a number.")
    try:
        size = int(value)
    except ValueError:
        raise ConfigError(f"batch_size={value!r} is not a number.") from None
    if size < 1:
        raise ConfigError(f"batch_size={size} must be at least 1.")
    return size


def open_model(ckpt: str | None, device, custom_model_class: str | None = None, hf_repo: str | None = None,
               hf_filename: str | None = None, tokenizer_backend: str = "auto", tokenizer_model_path: str | None = None,
               tokenizer_special_map_path: str | None = None):
    """(model, tokenizer, run config) from a checkpoint directory or an --out-ckpt .pt file, local
    or a file of the Hugging Face repo `hf_repo` (through the local HF cache); the tokenizer from
    `tokenizer_model_path` (local, else a file of `hf_repo`) when given, else the checkpoint's."""
    if custom_model_class is not None and custom_model_class not in CUSTOM_CLASSES:
        raise ConfigError(f"custom_model_class={custom_model_class}: this harness runs psann models only "
                          f"({' or '.join(CUSTOM_CLASSES)}).")
    if hf_repo:
        if not hf_filename:
            raise ConfigError("hf_repo needs hf_filename: the checkpoint file in the repo (e.g. final_model.pt).")
        ckpt = str(hub_file(hf_repo, hf_filename, tokenizer=False))
    elif hf_filename:
        raise ConfigError("hf_filename names a file of hf_repo; give hf_repo too, or pass a local file as ckpt.")
    if ckpt is None:
        raise ConfigError("--model psann needs a checkpoint: --model_args ckpt=DIR (or --ckpt DIR, or hf_repo + "
                          "hf_filename).")
    tokenizer = None
    if tokenizer_model_path:
        path = Path(tokenizer_model_path).expanduser()
        if not path.exists() and hf_repo:
            path = hub_file(hf_repo, tokenizer_model_path)
        if tokenizer_special_map_path:  # the roles are read beside tokenizer.json, as HF keeps them
            beside = (path.parent if path.is_file() else path) / SPECIAL_MAP_FILE
            given = Path(tokenizer_special_map_path).expanduser()
            if not given.exists() and hf_repo:
                given = hub_file(hf_repo, tokenizer_special_map_path, tokenizer=False)
            if not (given.is_file() and beside.is_file() and given.resolve() == beside.resolve()):
                raise ConfigError(f"tokenizer_special_map_path={tokenizer_special_map_path}: the special-token map is "
                                  f"read from {beside}, beside the tokenizer; put it there.")
        tokenizer = build_tokenizer(tokenizer_backend, model_path=path)
    elif tokenizer_special_map_path or tokenizer_backend != "auto":
        raise ConfigError("tokenizer_backend and tokenizer_special_map_path go with tokenizer_model_path.")
    if Path(ckpt).is_file():
        return load_exported(ckpt, device, tokenizer)
    model, saved, config = load_checkpoint(str(ckpt), device)
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(saved):
        log.warning("eval: tokenizer_model_path gives another tokenizer than the one %s was trained with.", ckpt)
    return model, tokenizer or saved, config


@register_model("psann")
class PsannLM(LM):
    """A psann checkpoint behind lm-eval's three request types. Diffusion checkpoints answer
    loglikelihood with a Monte-Carlo lower bound (`mc_draws` draws; a warning says so at load,
    and `is_bound` is True). batch_size=auto searches for the largest batch that fits, from
    `max_batch_size` (lm-eval's bound, 64 by default) down by halves."""

    ARGS = ("ckpt", "device", "batch_size", "max_length", "mc_draws", "seed", "max_gen_toks", *SOURCE_ARGS)

    def __init__(self, ckpt: str | None = None, device: str = "auto", batch_size=8, max_length: int | None = None,
                 mc_draws: int = 16, seed: int = 0, max_gen_toks: int = 256, max_batch_size=64, **source):
        super().__init__()
        unknown = set(source) - set(SOURCE_ARGS)
        if unknown:
            raise ConfigError(unknown_choice("psann model_args key", sorted(unknown)[0], self.ARGS))
        model, tokenizer, config = open_model(ckpt, resolve_device(str(device), "device"), **source)
        self.objective = objective_for(config.model)
        self.scorer = Scorer.for_model(model, tokenizer, config.model, None if max_length is None else int(max_length),
                                       int(mc_draws), int(seed))
        self.batch_size, self.seed, self.max_gen_toks = _batch_size(batch_size), int(seed), int(max_gen_toks)
        if self.batch_size == "auto":
            self.batch_size = self.scorer.find_batch_size(int(max_batch_size or 64))
        self._device = next(model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "PsannLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "PsannLM":
        """lm-eval passes its --device/--batch_size (with its own defaults) beside model_args;
        a key given in model_args wins instead of clashing."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def is_bound(self) -> bool:
        return self.scorer.diffusion is not None

    @property
    def tokenizer(self):
        return self.scorer.tokenizer

    @property
    def max_length(self) -> int:
        return self.scorer.max_len

    # -- scoring ------------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = self.scorer.loglikelihood([r.args for r in requests], self.batch_size, desc="loglikelihood")
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = self.scorer.loglikelihood_rolling([r.args[0] for r in requests], self.batch_size,
                                                    desc="loglikelihood_rolling")
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    # -- generation ---------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, with do_sample/temperature) continuations, batched per set of
        generation options, each cut before the first `until` string (and any end-of-turn token)."""
        results = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            options = requests[indices[0]].args[1]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                for i, text in zip(batch, self._generate([requests[i].args[0] for i in batch], options)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generate(self, contexts: list[str], options: dict) -> list[str]:
        # lm-eval's own reading of gen_kwargs: max-token aliases, `until` as a list, sampling when
        # do_sample is true or a temperature > 0 is given without it.
        options = dict(normalize_gen_kwargs(dict(options), default_max_gen_toks=self.max_gen_toks))
        until, max_new = options.pop("until"), int(options.pop("max_gen_toks"))
        do_sample, temperature = options.pop("do_sample"), float(options.pop("temperature", 0.0))
        temperature = temperature if do_sample else 0.0
        ignored = sorted(set(options) - GENERATE_OPTIONS)
        if ignored:
            log.warning("eval: generation options %s do not apply to psann models; ignored.", ignored)
        cap = self.max_length // 2 if self.is_bound else self.max_length - 1  # diffusion: prompt and canvas share it
        if max_new > cap:  # as lm-eval's HF model does: keep room for the prompt
            log.warning("eval: max_gen_toks=%d does not fit the %d-token context; generating %d.", max_new,
                        self.max_length, cap)
            max_new = cap
        # Not the checkpoint's saved sampling defaults: lm-eval asks for plain greedy unless it says otherwise.
        gen = GenerateConfig(max_new_tokens=max_new, temperature=temperature, stop=until,
                             **{"seed": self.seed, **{k: v for k, v in options.items() if k in GENERATE_OPTIONS}})
        tok = self.tokenizer
        keep = self.max_length - max_new  # prompt + answer within max_length, as scoring is
        prompts = [[tok.bos_id, *tok.encode_rendered(c)][-keep:] for c in contexts]
        return generate_text(self.scorer.model, tok, self.objective, prompts, gen, stop_ids=tok.chat_stop_ids)

    # -- chat templates -----------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    @property
    def tokenizer_name(self) -> str:
        return f"psann-{self.tokenizer.kind}-{tokenizer_fingerprint(self.tokenizer)}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return self.tokenizer.chat_template


# -- the command -----------------------------------------------------------------------------
def _has(argv: list[str], *flags: str) -> bool:
    return any(a in flags or a.split("=", 1)[0] in flags for a in argv)


def _underscored(arg: str) -> str:
    """lm-eval spells its flags with underscores; accept --num-fewshot for --num_fewshot."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


def lm_eval_argv(argv: list[str], ckpt: str | None, include_path: str | None, task_names: list[str]) -> list[str]:
    """The arguments of `lm-eval run`: ours filled in (model psann, device auto, batch size 8 unless given)."""
    out = [_underscored(a) for a in argv]
    for i, arg in enumerate(out):  # the 3B plan's spelling (its model_args name this class)
        if arg in ("--model", "-M") and i + 1 < len(out) and out[i + 1] == "custom":
            out[i + 1] = "psann"
        elif arg == "--model=custom":
            out[i] = "--model=psann"
    if not _has(out, "--model", "-M"):
        out += ["--model", "psann"]
    if ckpt:
        out += ["--model_args", json.dumps({"ckpt": ckpt})]
    if not _has(out, "--device"):  # defaults; device or batch_size in model_args win (create_from_arg_obj)
        out += ["--device", "auto"]
    if not _has(out, "--batch_size", "-b"):
        out += ["--batch_size", "8"]
    if include_path:
        if _has(out, "--include_path"):
            raise ConfigError("--mc-file/--ppl-file write their own task directory; pass them or --include_path, "
                              "not both (or add your YAMLs next to your data and use --include_path alone).")
        out += ["--include_path", include_path]
        if not _has(out, "--tasks", "-t"):
            out += ["--tasks", ",".join(task_names)]
    return out


def main(argv: list[str] | None = None, prog: str = "psannlm eval harness") -> int:
    setup_logging()
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Run lm-eval on a psann checkpoint (lm-eval's --model psann).",
        epilog="Every other argument goes to `lm-eval run` (see `lm-eval run --help`): --tasks, --num-fewshot, "
               "--limit, --batch-size, --apply-chat-template, --fewshot-as-multiturn, --output-path, ... "
               "Defaults here: --model psann --device auto --batch-size 8.")
    parser.add_argument("--ckpt", help="checkpoint directory (same as --model_args ckpt=DIR)")
    parser.add_argument("--mc-file", action="append", default=[], metavar="NAME=PATH",
                        help='multiple-choice task over a JSONL file of {"query", "choices", "gold"} (repeatable)')
    parser.add_argument("--ppl-file", action="append", default=[], metavar="NAME=PATH",
                        help='perplexity task over a JSONL file of {"text"} (repeatable)')
    parser.add_argument("--print-config", action="store_true", help="print the lm-eval arguments and exit")
    args, rest = parser.parse_known_args(argv)
    offline_env()
    with tempfile.TemporaryDirectory(prefix="psann-tasks-") as tmp:
        names = write_task_dir(tmp, {"mc": args.mc_file, "ppl": args.ppl_file})
        run_argv = lm_eval_argv(rest, args.ckpt, tmp if names else None, names)
        if args.print_config:
            print(json.dumps({"lm_eval_run": run_argv}, indent=2))
            return 0
        from lm_eval.__main__ import cli_evaluate

        saved, sys.argv = sys.argv, ["lm-eval", "run", *run_argv]
        try:
            cli_evaluate()
        finally:
            sys.argv = saved
    return 0
