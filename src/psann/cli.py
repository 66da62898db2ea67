"""The `psannlm` command: train, generate, chat, eval, bench, report, tokenizer, data, serve, export, import
and demo (each maps onto a module of psann.lm)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from psann import __version__
from psann.lm.config import config_keys_help
from psann.lm.console import SuggestingParser, setup_logging
from psann.lm.data.cli import add_parser as add_data_parser
from psann.lm.data.cli import run as run_data
from psann.lm.data.text import read_text_file, split_documents
from psann.lm.export.cli import add_parsers as add_export_parsers
from psann.lm.export.cli import run_export, run_import
from psann.lm.errors import ConfigError, DataError, PsannError, at_least
from psann.lm.infer.chat import ChatSession, chat_loop
from psann.lm.report.html import add_parser as add_report_parser
from psann.lm.report.html import run as run_report
from psann.lm.report.suite import add_parser as add_bench_parser
from psann.lm.report.suite import run as run_bench
from psann.lm.serve.cli import add_parser as add_serve_parser
from psann.lm.serve.cli import run as run_serve
from psann.lm.tokenizers.cli import add_parser as add_tokenizer_parser
from psann.lm.tokenizers.cli import run as run_tokenizer

# The commands that run a model import it (and torch) in their function, so that `psannlm tokenizer`,
# `data`, `report` and --help start torch-free.


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=at_least(1))
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    d = p.add_argument_group("diffusion models (block sampling)")
    d.add_argument("--steps", type=int, help="denoising steps in all (default: max-new-tokens)")
    d.add_argument("--block-length", type=int, help="tokens per semi-autoregressive block (divides max-new-tokens)")
    d.add_argument("--remasking", choices=("low_confidence", "random"))
    d.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (0 = off)")
    d.add_argument("--suppress-eos", action="store_const", const=True, default=None, help="never sample EOS")


def _generation_options(args) -> dict:
    if "" in (args.stop or []):
        raise ConfigError("--stop '' would end every reply before it starts; give a non-empty stop string.")
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed", "steps",
             "block_length", "remasking", "cfg_scale", "suppress_eos")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


@contextlib.contextmanager
def _flag_names(options: dict):
    """Errors about generation settings name the flags the user typed (--top-k), not the config keys (generate.top_k)."""
    try:
        yield
    except ConfigError as exc:
        message = str(exc)
        for name in options:
            message = message.replace(f"'generate.{name}'", "--" + name.replace("_", "-"))
        raise ConfigError(message) from None


def cmd_chat(args) -> int:
    from psann.lm import psannLM  # lazy: torch

    options = _generation_options(args)
    lm = psannLM.load(args.ckpt, device=args.device)
    with _flag_names(options):
        session = ChatSession(lm, system=getattr(args, "system", None), **options)
    if args.print_config:
        print(json.dumps(session.settings.to_dict(), indent=2))
        return 0
    return chat_loop(session)


def read_prompt_file(path: str) -> list[str]:
    """The non-blank lines of --prompt-file. Unlike training text, prompts are not read with
    replacement: a prompt of U+FFFD characters would only sample noise, so bad bytes are an error."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise DataError(f"--prompt-file {path} {what}; give a text file with one prompt per line.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"--prompt-file {path} is not UTF-8 text (invalid byte at offset {exc.start}); "
                        "save it as UTF-8.") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"--prompt-file {path} is empty (no non-blank lines); write one prompt per line.")
    return prompts


def cmd_generate(args) -> int:
    from psann.lm import psannLM  # lazy: torch

    if args.interactive:
        if args.prompt or args.prompt_file:
            raise ConfigError("--interactive reads messages from the terminal; drop --prompt/--prompt-file.")
        return cmd_chat(args)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise ConfigError("give --prompt TEXT (repeatable) or --prompt-file FILE (one prompt per line).")
    options = _generation_options(args)
    lm = psannLM.load(args.ckpt, device=args.device)
    with _flag_names(options):
        gen = lm.generation_settings(**options)
    if args.print_config:
        print(json.dumps(gen.to_dict(), indent=2))
        return 0
    batch = [p for p in prompts for _ in range(args.num_samples)]
    for prompt, text in zip(batch, lm.generate_batch(batch, **options)):
        print(f"--- {prompt!r}\n{prompt}{text}\n")
    return 0


EVAL_COLUMNS = (("base", "base", "{}"), ("objective", "objective", "{}"), ("params", "parameters", "{:,}"),
                ("loss", "nats/token", "{:.4f}"), ("nelbo_se", "+-", "{:.4f}"),
                ("ppl", "ppl", "{:.2f}"), ("bits_per_byte", "BPB", "{:.4f}"), ("byte_ppl", "ppl/byte", "{:.3f}"),
                ("accuracy", "acc", "{:.1%}"), ("top5_accuracy", "top-5", "{:.1%}"), ("utf8_valid", "UTF-8 ok", "{:.0%}"))


def read_eval_data(paths: list[str]) -> list[str]:
    """The text of each --data file, checked before any checkpoint loads. Invalid UTF-8 is replaced
    with a warning, as training does; an empty file is an error, since scoring nothing would report a
    perfect perplexity of 1."""
    texts = []
    for path in paths:
        if not Path(path).exists():  # --data is always a file, never literal text to score
            raise DataError(f"--data {path} not found; check the path.")
        texts.append(read_text_file(Path(path)))
        if not texts[-1].strip():
            raise DataError(f"--data {path} has no text to score (the file is empty or only whitespace); "
                            "give a text file.")
    return texts


def cmd_eval(args) -> int:
    import torch  # lazy: torch and the modules that need it

    from psann.lm.eval.evaluate import evaluate_text
    from psann.lm.models import count_parameters
    from psann.lm.objectives import objective_for
    from psann.lm.train.checkpoint import load_checkpoint

    texts = read_eval_data(args.data)
    results = []
    for ckpt in args.ckpt:  # the seed's compare_checkpoints: several checkpoints, one table
        model, tok, config = load_checkpoint(ckpt, args.device)
        docs = [d for text in texts for d in split_documents(text, config.data.doc_separator)]
        metrics = evaluate_text(model, tok, docs, objective_for(config.model), args.batch_size, torch.device(args.device),
                                samples=args.samples, sample_bytes=args.sample_bytes, seed=args.seed,
                                mc_draws=args.mc_draws)
        results.append({"ckpt": ckpt, "base": config.model.base, "objective": config.model.objective, "tokenizer": tok.kind,
                        "params": count_parameters(model), "data": args.data, **metrics})
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return 0
    header = ["checkpoint"] + [title for _, title, _ in EVAL_COLUMNS]
    rows = [[r["ckpt"]] + ["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in EVAL_COLUMNS]
            for r in results]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    print(f"\n{results[0]['tokens']:,} target tokens of the first checkpoint's tokenizer over {results[0]['bytes']:,} "
          "bytes; BPB = summed cross-entropy / ln 2 / bytes, comparable across tokenizers.")
    if any(r.get("bound") for r in results):
        print("diffusion rows: nats/token, ppl and BPB are Monte-Carlo NELBO upper bounds (+- one standard error).")
    return 0


def cmd_eval_form(form: str, argv: list[str]) -> int:
    """`psannlm eval harness ...` (lm-eval) and `psannlm eval mc ...`: sub-forms with their own options."""
    if form == "mc":
        from psann.lm.eval.mc import main as run  # lazy: torch
    else:
        try:
            from psann.lm.eval.harness import main as run  # lazy: torch, and lm-eval (an optional extra)
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run(argv, prog=f"psannlm eval {form}")


def cmd_train(args, extra) -> int:
    from psann.lm.train.cli import main as train_main  # lazy: torch

    argv = (["--config", args.config] if args.config else []) + (["--print-config"] if args.print_config else []) + extra
    return train_main(argv, prog="psannlm train")


def cmd_demo(args, extra) -> int:
    from psann.lm.demo import run_demo  # lazy: torch

    return run_demo(out=args.out, corpus_bytes=args.corpus_bytes, overrides=extra, print_config=args.print_config,
                    chat_steps=args.chat_steps)


def command_parsers(parser: argparse.ArgumentParser):
    """(command name, parser) of every command and sub-command of `parser`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        yield name, command
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from ((name, p) for p in action.choices.values())


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(sub.choices) if sub else {}


def _chosen_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The deepest (sub)command parser that argv names: its flags are the ones to suggest from."""
    for arg in argv:
        if arg in _subcommands(parser):
            parser = _subcommands(parser)[arg]
    return parser


def _unchosen_group(parser: argparse.ArgumentParser, argv: list[str]) -> dict | None:
    """For `psannlm tokenizer --print-config` (a group named without its subcommand): its subcommands."""
    chosen = _chosen_parser(parser, argv)
    return _subcommands(chosen) or None if chosen is not parser else None


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="psannlm", description="psann-lm: train, sample and evaluate small language models.")
    parser.add_argument("--version", action="version", version=f"psann-lm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML/TOML/JSON config (+ --section.key=value overrides)",
                       epilog=config_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a model. More flags (the earlier systems' spellings, --dry-run, --export-dir, "
                                   "...): python -m psann.lm.train.cli --help.")
    p.add_argument("--config")
    p.add_argument("--print-config", action="store_true")

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (e.g. runs/<name>/checkpoints/final)")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompt-file", help="file with one prompt per line")
    p.add_argument("--num-samples", type=at_least(1), default=1, help="samples per prompt")
    p.add_argument("--interactive", action="store_true", help="chat in the terminal (same as psannlm chat)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--print-config", action="store_true", help="print the resolved generation settings and exit")
    _generation_args(p)

    p = sub.add_parser("chat", help="talk to a checkpoint in the terminal (multi-turn, streamed replies, /commands)")
    p.add_argument("--ckpt", required=True, help="checkpoint directory")
    p.add_argument("--system", help="system message that opens the conversation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--print-config", action="store_true", help="print the resolved generation settings and exit")
    _generation_args(p)

    p = sub.add_parser("eval", help="loss, perplexity, bits per byte and accuracy of checkpoints on text files; "
                       "also `eval mc` (multiple-choice JSONL) and `eval harness` (lm-eval)")
    p.add_argument("--print-config", action="store_true", help="print the resolved options and exit")
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint directory (repeat to compare several)")
    p.add_argument("--data", nargs="+", required=True, help="text files")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=at_least(0), default=8, help="sampled continuations for the UTF-8 validity check (byte models)")
    p.add_argument("--sample-bytes", type=at_least(1), default=128, help="length of each sampled continuation")
    p.add_argument("--seed", type=int, default=0, help="sampling and masking seed")
    p.add_argument("--mc-draws", type=at_least(1), default=16, help="diffusion models: Monte-Carlo draws per sequence of the NELBO")
    p.add_argument("--json", action="store_true", help="print JSON (one object, or a list for several checkpoints)")
    add_tokenizer_parser(sub)
    add_data_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    add_serve_parser(sub)
    add_export_parsers(sub)
    for _, p in command_parsers(parser):  # every command (and sub-command) can show what it would run with
        if not any("--print-config" in a.option_strings for a in p._actions):
            p.add_argument("--print-config", action="store_true", help="print the resolved options and exit")

    p = sub.add_parser("demo", help="generate a story corpus, train a tokenizer and a small model (~3 min on 2 CPU cores), sample",
                       epilog=config_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="run directory (default runs/demo-<timestamp>)")
    p.add_argument("--corpus-bytes", type=int, default=3_000_000, help="size of the generated corpus")
    p.add_argument("--chat", dest="chat_steps", type=int, nargs="?", const=150, default=0, metavar="STEPS",
                   help="then fine-tune for chat on generated story requests (default 150 steps) and talk to it")
    p.add_argument("--print-config", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"] and argv[1:2] in (["harness"], ["mc"]):  # before argparse: `eval` alone needs --ckpt/--data
        try:
            return cmd_eval_form(argv[1], argv[2:])
        except PsannError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    if "--print-config" in argv:  # shows what a command would run with, so its required options may be left out
        for name, p in command_parsers(parser):
            if name not in ("generate", "chat"):  # these resolve their settings against --ckpt
                for action in p._actions:  # a group's subcommand too: `tokenizer --print-config` lists them
                    action.required = action.required and not action.option_strings and not isinstance(
                        action, argparse._SubParsersAction)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "demo"):
        command = _chosen_parser(parser, argv)
        command.error(f"unrecognised arguments: {' '.join(extra)}")
    if getattr(args, "print_config", False) and _unchosen_group(parser, argv) is not None:
        group = _unchosen_group(parser, argv)
        print(json.dumps({name: {a.dest: a.default for a in p._actions if a.option_strings and a.dest not in (
            "help", "print_config")} for name, p in group.items()}, indent=2, default=str))
        return 0
    try:
        if getattr(args, "device", None) is not None:  # resolved before anything loads, so errors name --device
            from psann.lm.train.trainer import resolve_device  # lazy: torch

            args.device = str(resolve_device(args.device, "--device"))
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "demo":
            return cmd_demo(args, extra)
        if args.command == "bench":  # prints its settings resolved from the scale presets
            return run_bench(args)
        if args.command == "tokenizer":  # resolves its own options (the special tokens a vocabulary holds)
            return run_tokenizer(args)
        if args.print_config and args.command not in ("generate", "chat"):  # these resolve against the checkpoint
            print(json.dumps({k: v for k, v in vars(args).items() if k != "print_config"}, indent=2))
            return 0
        if args.command == "data":
            return run_data(args)
        if args.command == "report":
            return run_report(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command in ("export", "import"):
            return run_export(args) if args.command == "export" else run_import(args)
        return {"generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval}[args.command](args)
    except PsannError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
