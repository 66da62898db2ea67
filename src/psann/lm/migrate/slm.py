"""The Simplified SLM training guide's scripts on psann-lm: `scripts/prepare_tinystories.py`,
`train.py`, `generate.py`, `scripts/evaluate_model.py` and `scripts/run_experiment.py`
(byte-level models), with their flags, defaults and outputs.

A prepared data directory holds train.txt and validation.txt (stories joined by <|endoftext|>)
and dataset_info.json; training reads it with the byte tokenizer, as the byte-level models of
that package did. Checkpoints are psann-lm's directories (OUT/checkpoints/step_0001000, best,
final), not .pt files.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

from ..data.text import read_text_file
from ..console import SuggestingParser
from ..errors import ConfigError, DataError
from ..files import read_json, write_atomic
from . import guarded

EOT = "<|endoftext|>"
INFO_FILE = "dataset_info.json"
SPLITS = {"train": "train.txt", "validation": "validation.txt"}


# -- prepare_tinystories.py -------------------------------------------------------------------------
def _stories_from_file(path: str) -> list[str]:
    if not Path(path).is_file():
        raise DataError(f"--input {path} not found; give a TinyStories text file (stories separated by {EOT}).")
    return [s.strip() for s in read_text_file(Path(path)).split(EOT) if s.strip()]


def _stories_from_hub(split: str) -> list[str]:
    try:
        import datasets  # lazy: the hf-data extra, and only without --input
    except ImportError:
        raise DataError("reading TinyStories from the Hugging Face hub needs `pip install 'psann-lm[hf-data]'`; "
                        "or pass a local file with --input.") from None
    try:
        rows = datasets.load_dataset("roneneldan/TinyStories", split=split)
    except Exception as exc:  # offline, or the hub refused: the message says which
        raise DataError(f"cannot load roneneldan/TinyStories ({split}) from the hub ({type(exc).__name__}: {exc}); "
                        "pass a local TinyStories file with --input (and --valid_input).") from None
    return [r["text"].strip() for r in rows if r["text"].strip()]


def dataset_stats(stories: dict[str, list[str]], max_seq_length: int) -> dict:
    """Counts of a prepared directory. A sequence is a packed window of max_seq_length byte tokens
    over the documents, each wrapped in BOS ... EOS, as training reads them."""
    stats = {"max_seq_length": max_seq_length}
    for split, docs in stories.items():
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        tokens = n_bytes + 2 * len(docs)
        stats[split] = {"samples": len(docs), "bytes": n_bytes,
                        "sequences": math.ceil((tokens - 1) / max_seq_length) if tokens > 1 else 0}
    return stats


def print_dataset_stats(stats: dict) -> None:
    train, val = stats["train"], stats["validation"]
    print("Dataset Statistics\n==================")
    print(f"Number of original samples: {train['samples'] + val['samples']:,}")
    print(f"Total bytes: {train['bytes'] + val['bytes']:,}")
    print(f"Training sequences: {train['sequences']:,}")
    print(f"Validation sequences: {val['sequences']:,}")
    print(f"Max sequence length: {stats['max_seq_length']}")


def prepare_main(argv: list[str] | None = None) -> int:
    parser = SuggestingParser(prog="scripts/prepare_tinystories.py", description="Prepare TinyStories for "
                                     "byte-level training (the Simplified SLM script on psann-lm).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--max_samples", type=int, default=None, help="cap on training stories (default: all)")
    parser.add_argument("--input", help="a local TinyStories file (default: roneneldan/TinyStories from the hub)")
    parser.add_argument("--valid_input", help="a local validation file (default: the hub's, or 2%% of --input)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def run() -> int:
        if args.max_seq_length < 2 or (args.max_samples is not None and args.max_samples < 1):
            raise ConfigError("--max_seq_length must be at least 2 and --max_samples at least 1.")
        if args.input:
            train = _stories_from_file(args.input)
            if args.valid_input:
                val = _stories_from_file(args.valid_input)
            else:
                random.Random(args.seed).shuffle(train)
                n_val = max(1, len(train) // 50)
                val, train = train[:n_val], train[n_val:]
        else:
            train, val = _stories_from_hub("train"), _stories_from_hub("validation")
        if args.max_samples:
            train, val = train[:args.max_samples], val[:max(1, args.max_samples // 20)]
        if not train or not val:
            raise DataError("the input holds too few stories for a training and a validation split.")
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        stories = {"train": train, "validation": val}
        for split, name in SPLITS.items():
            write_atomic(out / name, EOT.join(stories[split]))
        stats = dataset_stats(stories, args.max_seq_length)
        stats["source"] = args.input or "hf:roneneldan/TinyStories"
        write_atomic(out / INFO_FILE, json.dumps(stats, indent=2) + "\n")
        print_dataset_stats(stats)
        return 0
    return guarded(run)


# -- train.py ---------------------------------------------------------------------------------------
AMP = {"bf16": "bf16", "fp16": "fp16", "none": "fp32", "no": "fp32", "fp32": "fp32"}


def _data_overrides(data_path: str, max_seq_length: int | None) -> list[str]:
    directory = Path(data_path)
    files = {split: directory / name for split, name in SPLITS.items()}
    texts = sorted(str(p) for p in directory.glob("*.txt")) if directory.is_dir() else []
    if texts and not files["train"].is_file():  # a directory of .txt files: one document each, 10% held out
        return [f"--data.train_files=[{','.join(texts)}]", "--data.tokenizer=byte", "--data.val_split=0.1",
                f"--data.max_length={max_seq_length or 512}"]
    if not directory.is_dir() or not files["train"].is_file():
        raise DataError(f"--data_path {directory} holds no {SPLITS['train']}; make it with "
                        f"`python scripts/prepare_tinystories.py --output_dir {directory}`, or give a directory "
                        "of .txt files.")
    info = json.loads((directory / INFO_FILE).read_text()) if (directory / INFO_FILE).is_file() else {}
    length = max_seq_length or info.get("max_seq_length", 512)
    val = [str(files["validation"])] if files["validation"].is_file() else []
    return [f"--data.train_files=[{files['train']}]", f"--data.val_files=[{','.join(val)}]", "--data.doc_separator=eot",
            "--data.tokenizer=byte", f"--data.max_length={length}"]


def _resume(path: str) -> tuple[str, str | None]:
    """(resume_from, checkpoint_dir): a run directory resumes its latest intact checkpoint."""
    if path.endswith(".pt"):
        raise ConfigError(f"--resume_from {path}: psann-lm checkpoints are directories; give the run directory "
                          "(--output_dir of the first run: its latest checkpoint) or RUN/checkpoints/step_0005000.")
    if (Path(path) / "checkpoints").is_dir():
        return "latest", path
    return path, None


def write_logs(run_dir: Path, byte_level: bool) -> dict[str, Path]:
    """training_log.csv and eval_log.csv from the run's metrics.jsonl; byte models get bpb (loss / ln 2)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    written = {}
    for kind, name, loss_key in (("train", "training_log.csv", "loss"), ("val", "eval_log.csv", "val_loss")):
        rows = [r for r in records if r.get("kind") == kind]
        for row in rows:
            row["learning_rate"] = row.get("lr")
            if byte_level and row.get(loss_key) is not None:
                row["bpb"] = row[loss_key] / math.log(2)
        columns = list(dict.fromkeys(k for row in rows for k in row if k != "kind"))
        path = run_dir / name
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: v for k, v in row.items() if k != "kind"} for row in rows)
        written[name] = path
    return written


def train_main(argv: list[str] | None = None) -> int:
    parser = SuggestingParser(prog="train.py", description="Train a byte-level model (the Simplified SLM "
                                     "train.py on psann-lm).")
    parser.add_argument("--model_config", help="a model JSON (examples/lm/configs/slm_base.json, hnet_bit_*.json)")
    parser.add_argument("--data_path", help="a directory from scripts/prepare_tinystories.py")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per micro-batch")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--warmup_steps", type=int, default=500)
    parser.add_argument("--scheduler", choices=("cosine", "linear"), default="cosine")
    parser.add_argument("--mixed_precision", choices=sorted(AMP), default="bf16")
    parser.add_argument("--max_steps", type=int, default=10000)
    parser.add_argument("--max_seq_length", type=int, default=None, help="default: the data directory's")
    parser.add_argument("--eval_interval", type=int, default=500)
    parser.add_argument("--log_interval", type=int, default=10, help="steps between rows of training_log.csv")
    parser.add_argument("--save_interval", type=int, default=1000)
    parser.add_argument("--output_dir", help="the run directory (checkpoints/, logs)")
    parser.add_argument("--resume_from", help="a run directory or one of its checkpoints")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)

    def run() -> int:
        resume, run_dir = _resume(args.resume_from) if args.resume_from else (None, None)
        out = args.output_dir or run_dir
        if not out or not (args.resume_from or (args.model_config and args.data_path)):
            raise ConfigError("give --model_config, --data_path and --output_dir (or --resume_from RUN_DIR).")
        overrides = [] if args.resume_from and not args.data_path else _data_overrides(args.data_path, args.max_seq_length)
        # tensorboard/ in the run directory when the extra is installed, as the earlier trainer wrote it
        tensorboard = ",tensorboard" if importlib.util.find_spec("tensorboard") else ""
        overrides += [f"--train.{k}={v}" for k, v in {
            "micro_batch_size": args.batch_size, "grad_accum_steps": args.gradient_accumulation_steps,
            "lr": args.learning_rate, "weight_decay": args.weight_decay, "grad_clip": args.max_grad_norm,
            "warmup_steps": args.warmup_steps, "lr_schedule": args.scheduler, "optimizer": "adamw", "amp": AMP[args.mixed_precision],
            "max_steps": args.max_steps, "eval_interval_steps": args.eval_interval, "log_interval_steps": args.log_interval,
            "save_interval_steps": args.save_interval, "checkpoint_dir": out, "device": args.device,
            "seed": args.seed, "loggers": f"[console,jsonl,csv{tensorboard}]"}.items()]
        if resume:
            overrides.append(f"--train.resume_from={resume}")
        from ..train.cli import load_with_windows  # lazy: torch (train.run), which preparing data does not need
        from ..train.run import train

        config = load_with_windows(args.model_config, overrides, args.batch_size * args.gradient_accumulation_steps)

        run = train(config)
        logs = write_logs(Path(run.info["run_dir"]), run.tokenizer.kind == "byte")
        print(json.dumps({**run.info, **{k: str(v) for k, v in logs.items()}}, indent=2))
        return 0
    return guarded(run)


# -- generate.py ------------------------------------------------------------------------------------
def _checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory (its best checkpoint, else its final one)."""
    run = Path(path)
    for name in ("best", "final"):
        if (run / "checkpoints" / name).is_dir():
            return str(run / "checkpoints" / name)
    if path.endswith(".pt") and not run.exists():
        raise ConfigError(f"--model_path {path}: psann-lm checkpoints are directories: RUN/checkpoints/best (or "
                          "the run directory itself).")
    return path


def _interactive(lm, options: dict) -> int:
    """Plain prompt continuation (not chat): /quit, /temp v, /topk v, /topp v."""
    keys = {"/temp": ("temperature", float), "/topk": ("top_k", int), "/topp": ("top_p", float)}
    print("Enter a prompt to continue; /quit, /temp <v>, /topk <v>, /topp <v>.", file=sys.stderr)
    for line in sys.stdin:
        prompt = line.rstrip("\n")
        word, _, value = prompt.partition(" ")
        if word == "/quit":
            break
        if word in keys:
            key, kind = keys[word]
            try:
                options[key] = kind(value)
                lm.generation_settings(**options)
            except (ValueError, ConfigError) as exc:
                options.pop(key, None)
                print(f"error: {word} {value!r}: {exc}", file=sys.stderr)
            continue
        if prompt:
            print(prompt + lm.generate(prompt, **options), flush=True)
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    parser = SuggestingParser(prog="generate.py", description="Generate text (the Simplified SLM "
                                     "generate.py on psann-lm).")
    parser.add_argument("--model_path", required=True, help="a checkpoint directory, or a run directory (its best)")
    parser.add_argument("--prompt")
    parser.add_argument("--prompt_file", help="one prompt per line")
    parser.add_argument("--output_file", help="also write the generations here")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--max_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--interactive", action="store_true")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    def run() -> int:
        from .. import psannLM  # lazy: torch

        if args.num_samples < 1:
            raise ConfigError("--num_samples must be at least 1.")
        lm = psannLM.load(_checkpoint(args.model_path), device=args.device)
        options = {"max_new_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
                   "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}
        if args.seed is not None:
            options["seed"] = args.seed
        lm.generation_settings(**options)  # a bad value stops here, naming the key
        if args.interactive:
            return _interactive(lm, options)
        prompts = [args.prompt] if args.prompt is not None else []
        if args.prompt_file:
            prompts += [p for p in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if p.strip()]
        if not prompts:
            raise ConfigError("give --prompt TEXT, --prompt_file FILE or --interactive.")
        batch = [p for p in prompts for _ in range(args.num_samples)]
        texts = [p + t for p, t in zip(batch, lm.generate_batch(batch, **options))]
        for text in texts:
            print(text + "\n")
        if args.output_file:
            write_atomic(Path(args.output_file), "\n\n".join(texts) + "\n")
        return 0
    return guarded(run)


# -- scripts/evaluate_model.py ----------------------------------------------------------------------
def evaluate(model_path: str, data_dir: str, output_dir: str, *, batch_size: int = 8, device: str = "cpu",
             seed: int = 0) -> dict:
    """BPB, perplexity, accuracy, top-5 accuracy and UTF-8 validity on the data directory's held-out
    split (test.txt when present, else validation.txt), written to output_dir/evaluation_results.json."""
    import torch  # lazy: torch and the modules that need it

    from ..eval.evaluate import evaluate_text
    from ..models import count_parameters
    from ..objectives import objective_for
    from ..train.checkpoint import load_checkpoint

    split = next((Path(data_dir) / n for n in ("test.txt", SPLITS["validation"]) if (Path(data_dir) / n).is_file()), None)
    if split is None:
        raise DataError(f"--data_dir {data_dir} holds no test.txt or {SPLITS['validation']} to evaluate on.")
    checkpoint = _checkpoint(model_path)
    model, tok, config = load_checkpoint(checkpoint, device)
    docs = [d.strip() for d in read_text_file(split).split(EOT) if d.strip()]
    metrics = evaluate_text(model, tok, docs, objective_for(config.model), batch_size, torch.device(device), seed=seed)
    results = {"model_path": checkpoint, "data": str(split), "parameters": count_parameters(model),
               "bpb": metrics["bits_per_byte"], "perplexity": metrics["ppl"], "loss": metrics["loss"],
               "accuracy": metrics["accuracy"], "top5_accuracy": metrics["top5_accuracy"],
               "utf8_validity": metrics["utf8_valid"], "tokens": metrics["tokens"], "bytes": metrics["bytes"]}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "evaluation_results.json", json.dumps(results, indent=2) + "\n")
    return results


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = SuggestingParser(prog="scripts/evaluate_model.py", description="Evaluate a checkpoint (the "
                                     "Simplified SLM script on psann-lm).")
    parser.add_argument("--model_path", required=True, help="a checkpoint directory, or a run directory (its best)")
    parser.add_argument("--data_dir", required=True, help="a directory from scripts/prepare_tinystories.py")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    return guarded(lambda: print(json.dumps(evaluate(args.model_path, args.data_dir, args.output_dir,
                                                     batch_size=args.batch_size, device=args.device), indent=2)) or 0)


# -- scripts/run_experiment.py ----------------------------------------------------------------------
EXPERIMENT_LAYOUT = {
    "model": {"config_file", "type"}, "data": {"data_dir", "max_seq_length"},
    "training": {"batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay", "max_grad_norm",
                 "warmup_steps", "scheduler", "mixed_precision", "max_steps", "eval_interval", "save_interval",
                 "log_interval", "max_seq_length", "seed", "device"},
    "output": {"checkpoint_dir", "log_dir", "results_dir"},
    "generation": {"prompts", "max_tokens", "temperature", "top_k", "top_p"},
}
MODEL_TYPES = {"flat": "hgrn_bit", "hnet_bit": "hnet_bit", "hierarchical": "hnet_bit"}


def _read_experiment(path: str) -> dict:
    experiment = read_json(Path(path), ConfigError, "experiment config")
    if not isinstance(experiment, dict) or not isinstance(experiment.get("experiment_name"), str):
        raise ConfigError(f"{path}: an experiment config is a JSON object with an experiment_name.")
    for section, table in experiment.items():
        if section == "experiment_name":
            continue
        if section not in EXPERIMENT_LAYOUT or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section {section!r}; sections: experiment_name, "
                              f"{', '.join(EXPERIMENT_LAYOUT)}.")
        unknown = sorted(set(table) - EXPERIMENT_LAYOUT[section])
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; keys of "
                              f"{section}: {', '.join(sorted(EXPERIMENT_LAYOUT[section]))}.")
    for key in ("model.config_file", "data.data_dir"):
        section, name = key.split(".")
        if not experiment.get(section, {}).get(name):
            raise ConfigError(f"{path}: {key} is required.")
    kind = experiment["model"].get("type")
    if kind is not None and kind not in MODEL_TYPES:
        raise ConfigError(f"{path}: model.type {kind!r} is not one of {', '.join(MODEL_TYPES)}.")
    model_file = experiment["model"]["config_file"]
    model_type = read_json(Path(model_file), ConfigError, "model config").get("model_type") \
        if Path(model_file).is_file() else None
    hierarchical = model_type in ("hnet_bit", "hnet")
    if kind is not None and model_type is not None and (MODEL_TYPES[kind] == "hnet_bit") != hierarchical:
        raise ConfigError(f"{path}: model.type {kind!r} but {model_file} describes a {model_type} model.")
    return experiment


def run_experiment_main(argv: list[str] | None = None) -> int:
    parser = SuggestingParser(prog="scripts/run_experiment.py", description="Train, evaluate and sample in "
                                     "one go from an experiment JSON (the Simplified SLM script on psann-lm).")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)

    def run() -> int:
        exp = _read_experiment(args.config)
        name, training, output = exp["experiment_name"], exp.get("training", {}), exp.get("output", {})
        checkpoint_dir = output.get("checkpoint_dir", f"./checkpoints/{name}")
        log_dir = Path(output.get("log_dir", f"./logs/{name}"))
        results_dir = Path(output.get("results_dir", f"./results/{name}"))
        flags = ["--model_config", exp["model"]["config_file"], "--data_path", exp["data"]["data_dir"],
                 "--output_dir", checkpoint_dir]
        length = exp["data"].get("max_seq_length", training.get("max_seq_length"))
        if length is not None:
            flags += ["--max_seq_length", str(length)]
        for key, value in training.items():
            if key != "max_seq_length":
                flags += [f"--{key}", str(value)]
        started = time.time()
        if train_main(flags) != 0:
            return 2
        run_dir = Path(checkpoint_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        for log in ("training_log.csv", "eval_log.csv"):
            shutil.copy(run_dir / log, log_dir / log)
        if (run_dir / "tensorboard").is_dir():
            shutil.copytree(run_dir / "tensorboard", log_dir / "tensorboard", dirs_exist_ok=True)
        results = evaluate(checkpoint_dir, exp["data"]["data_dir"], str(results_dir))
        gen = exp.get("generation", {})
        from .. import psannLM  # lazy: torch

        lm = psannLM.load(_checkpoint(checkpoint_dir))
        prompts = gen.get("prompts", ["Once upon a time"])
        texts = [p + t for p, t in zip(prompts, lm.generate_batch(prompts, max_new_tokens=gen.get("max_tokens", 100),
                                                                  temperature=gen.get("temperature", 0.8),
                                                                  top_k=gen.get("top_k", 50), top_p=gen.get("top_p", 0.9),
                                                                  seed=training.get("seed", 0)))]
        write_atomic(results_dir / "generations.txt", "\n\n".join(texts) + "\n")
        summary = {"experiment_name": name, "config": exp, "checkpoint_dir": checkpoint_dir, "log_dir": str(log_dir),
                   "results_dir": str(results_dir), "evaluation": results, "seconds": round(time.time() - started, 1),
                   "final_checkpoint": str(run_dir / "checkpoints" / "final")}
        write_atomic(results_dir / "experiment_summary.json", json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary["evaluation"], indent=2))
        return 0
    return guarded(run)
