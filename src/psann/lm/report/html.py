"""`psannlm report RUN_DIR...`: one self-contained HTML page comparing training runs and bench suites.

A run directory is what the trainer writes (metrics.jsonl, config.yaml, checkpoints/final); a
suite directory is what `psannlm bench suite` writes (suite.json, system.json, throughput.csv,
memory.json and its baseline run in baseline/). The page inlines its plots as base64 PNG and its
CSS, and links nothing outside itself.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from safetensors import safe_open

from ..errors import ConfigError, DataError
from ..files import write_atomic
from ..train.metrics import read_metrics, summarize_metrics

SAMPLE_PROMPTS = ("Once upon a time", "The dog")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page (plots, tables, samples) comparing runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="trainer run directories (metrics.jsonl) and/or `psannlm bench suite` output directories")
    p.add_argument("--out", default="report.html", help="HTML file to write")
    p.add_argument("--title", default="psann-lm report")
    p.add_argument("--no-samples", action="store_true", help="skip the greedy samples from each run's final checkpoint")
    p.add_argument("--prompt", action="append", help=f"sample prompt (repeatable; default: {', '.join(SAMPLE_PROMPTS)})")
    p.add_argument("--max-new-tokens", type=int, default=40, help="length of each sample")
    p.add_argument("--device", default="cpu", help="device the samples are generated on")
    p.add_argument("--bpb-text", metavar="FILE", help="text whose bytes per token under each run's tokenizer turn "
                   "nats/token into bits per byte (default: the first run's validation or training text file)")


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    runs, suites = load_inputs(args.runs)
    bpb_source = measure_bytes_per_token(runs, args.bpb_text)
    samples = {}
    if not args.no_samples:
        prompts = args.prompt or list(SAMPLE_PROMPTS)
        samples = {r.name: generate_samples(r.checkpoint, prompts, args.max_new_tokens, args.device)
                   for r in runs if r.checkpoint}
    out = write_report(args.out, runs, suites, samples, title=args.title, bpb_source=bpb_source)
    print(f"wrote {out} ({len(runs)} run(s), {len(suites)} suite(s))")
    return 0


# --- reading runs and suites --------------------------------------------------------------------
@dataclass
class Run:
    name: str
    path: Path
    records: list[dict]
    config: object | None  # RunConfig, when the run left one
    checkpoint: Path | None  # checkpoints/final
    parameters: int | None
    tokenizer: str | None = None  # "kind vocab", from the final checkpoint
    bytes_per_token: float | None = None  # of the --bpb-text under this run's tokenizer


@dataclass
class Suite:
    name: str
    path: Path
    info: dict  # suite.json
    system: dict
    throughput: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); rerun `psannlm bench suite` to rewrite it.") from exc


def _run_config(path: Path):
    # lazy: torch (checkpoint) and yaml (config); the psannlm parser imports this module
    from ..config import load_config
    from ..train.checkpoint import read_checkpoint_config

    final = path / "checkpoints" / "final"
    if (final / "config.json").exists():
        return read_checkpoint_config(final)
    return load_config(path / "config.yaml") if (path / "config.yaml").exists() else None


def _count_parameters(checkpoint: Path) -> int | None:
    """From the safetensors header alone (tied tensors are stored once); None for sharded checkpoints."""
    weights = checkpoint / "model.safetensors"
    if not weights.exists():
        return None
    with safe_open(str(weights), framework="pt") as fh:
        return sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())


def load_run(path: Path, name: str) -> Run:
    final = path / "checkpoints" / "final"
    checkpoint = final if (final / "config.json").exists() else None
    return Run(name, path, read_metrics(path / "metrics.jsonl"), _run_config(path), checkpoint,
               _count_parameters(checkpoint) if checkpoint else None)


BPB_TEXT_BYTES = 1 << 20  # enough text for a stable bytes/token ratio, quick to encode


def _bpb_text(given: str | None, runs: list[Run]) -> tuple[str | None, str | None]:
    """(text, its path): --bpb-text, else the first existing validation or training file of a run's config."""
    candidates = [given] if given else [f for r in runs if r.config is not None
                                         for f in (*r.config.data.val_files, *r.config.data.train_files)]
    for path in candidates:
        if Path(path).is_file():
            with open(path, "rb") as fh:
                return fh.read(BPB_TEXT_BYTES).decode("utf-8", errors="replace"), str(path)
        if given:
            raise DataError(f"--bpb-text {given} not found.")
    return None, None


def measure_bytes_per_token(runs: list[Run], given: str | None = None) -> str | None:
    """Fill each run's tokenizer and bytes per token (on one text for all); -> the text's path."""
    from ..tokenizers import load_tokenizer  # lazy: the report's parser is built with the psannlm command

    text, source = _bpb_text(given, runs)
    for r in runs:
        if r.checkpoint is None or not (r.checkpoint / "tokenizer").is_dir():
            continue
        tok = load_tokenizer(r.checkpoint / "tokenizer")
        r.tokenizer = f"{tok.kind} {tok.vocab_size:,}"
        if text:
            r.bytes_per_token = len(text.encode("utf-8")) / max(1, len(tok.encode(text)))
    return source


def load_suite(path: Path, name: str) -> tuple[Suite, Run | None]:
    def optional(file: str, read):
        return read(path / file) if (path / file).exists() else None

    suite = Suite(name, path, _read_json(path / "suite.json"), optional("system.json", _read_json) or {},
                  optional("throughput.csv", lambda p: list(csv.DictReader(p.read_text(encoding="utf-8").splitlines()))) or [],
                  optional("memory.json", _read_json) or {})
    baseline = path / "baseline"
    return suite, (load_run(baseline, f"{name}/baseline") if (baseline / "metrics.jsonl").exists() else None)


def _names(paths: list[Path]) -> list[str]:
    """Each directory's name, with its parent's when two inputs share one."""
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def load_inputs(paths: list[str]) -> tuple[list[Run], list[Suite]]:
    resolved = [Path(p).resolve() for p in paths]
    runs, suites = [], []
    for path, given, name in zip(resolved, paths, _names(resolved)):
        if (path / "suite.json").exists():
            suite, baseline = load_suite(path, name)
            suites.append(suite)
            runs += [baseline] if baseline else []
        elif (path / "metrics.jsonl").exists():
            runs.append(load_run(path, name))
        else:
            raise DataError(f"{given} is neither a run directory (no metrics.jsonl) nor a bench suite output "
                            "(no suite.json); pass the directory training or `psannlm bench suite` wrote.")
    return runs, suites


# --- numbers ------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("the report's plots need matplotlib: pip install 'psann-lm[viz]'.") from exc
    return plt


def curves_png(runs: list[tuple[str, list[dict]]], bytes_per_token: dict[str, float] | None = None) -> bytes:
    """Loss (left) and perplexity (right, log scale) against tokens seen: a line per run for
    training, markers for validation, each in its own colour. With `bytes_per_token` (runs with
    different tokenizers) the loss is in bits per byte and the right panel is per-byte perplexity."""
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter

    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, records) in enumerate(runs):
        train_colour, val_colour = f"C{(2 * i) % 10}", f"C{(2 * i + 1) % 10}"
        scale = 1.0 if bytes_per_token is None else 1.0 / math.log(2) / bytes_per_token[name]
        train = [(r["tokens"], r["loss"] * scale) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
        val = [(r["tokens"], r["val_loss"] * scale) for r in records
               if r.get("kind") == "val" and r.get("val_loss") is not None]
        ppl = (lambda v: math.exp(min(v, 50.0))) if bytes_per_token is None else (lambda v: 2.0 ** min(v, 50.0))
        for ax, f in ((loss_ax, lambda v: v), (ppl_ax, ppl)):
            if train:  # a run logged only once still shows its point
                ax.plot([t for t, _ in train], [f(v) for _, v in train], "-" if len(train) > 1 else "s",
                        color=train_colour, linewidth=1.3, markersize=4, label=f"{name} train")
            if val:
                ax.plot([t for t, _ in val], [f(v) for _, v in val], "o--", color=val_colour, markersize=4,
                        linewidth=0.8, label=f"{name} validation")
    loss_ax.set_ylabel("cross-entropy (nats/token)" if bytes_per_token is None else "bits per byte")
    ppl_ax.set_ylabel("perplexity" if bytes_per_token is None else "per-byte perplexity (2^BPB)")
    ppl_ax.set_yscale("log")
    for ax in (loss_ax, ppl_ax):
        ax.set_xlabel("tokens seen")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def generate_samples(checkpoint: Path, prompts: list[str], max_new_tokens: int, device: str) -> list[tuple[str, str]]:
    """Greedy continuations (seed 0, no penalties), so two reports of one checkpoint agree."""
    # lazy: torch; the psannlm parser imports this module
    from ..config import GenerateConfig
    from ..infer.generate import generate_text
    from ..objectives import objective_for
    from ..train.checkpoint import load_checkpoint

    model, tok, config = load_checkpoint(checkpoint, device)
    greedy = GenerateConfig(**{**config.generate.to_dict(), "temperature": 0.0, "max_new_tokens": max_new_tokens,
                               "seed": 0, "top_k": None, "top_p": 1.0, "repetition_penalty": 1.0, "stop": [],
                               "block_length": None, "steps": None})
    texts = generate_text(model, tok, objective_for(config.model), [tok.encode(p, add_bos=True) for p in prompts], greedy)
    return list(zip(prompts, texts))


# --- HTML ---------------------------------------------------------------------------------------
CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; background: #f6f7f9;
       margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #dde1e8; }
h3 { font-size: 16px; margin: 20px 0 8px; }
.meta, .note { color: #5b6475; font-size: 13px; }
.card { background: #fff; border: 1px solid #dde1e8; border-radius: 8px; padding: 14px 16px; margin: 10px 0; }
img { max-width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; background: #fff; }
th, td { border: 1px solid #dde1e8; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
tbody th { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
code { font-size: 12.5px; background: #eef1f5; padding: 1px 4px; border-radius: 3px; word-break: break-all; }
.sample { margin: 8px 0; }
.sample pre { white-space: pre-wrap; word-wrap: break-word; margin: 4px 0 0; padding: 8px 10px; background: #f3f5f8;
              border-radius: 6px; font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace; }
.prompt { font-weight: 600; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, spec: str = "{:,.4g}") -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    return spec.format(value)


def table(header: list[str] | None, rows: list[list], numeric: set[int] = frozenset()) -> str:
    """Cells are escaped here; columns in `numeric` are right-aligned. Without a header the first
    column labels the rows."""
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>"

    def cell(i, c):
        if header is None and i == 0:
            return f'<th scope="row">{esc(c)}</th>'
        return f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"

    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table>{head}<tbody>{body}</tbody></table></div>'


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


RUN_HEADER = ["run", "base", "tokenizer", "params", "d_model x layers", "batch tokens", "steps", "tokens", "train loss",
              "val loss", "val ppl", "val BPB", "tok/s", "MFU", "peak mem GB"]


def _run_row(run: Run) -> list:
    s, config = summarize_metrics(run.records), run.config
    model = getattr(config, "model", None)
    base = "-" if model is None else model.base + ("" if model.objective == "causal" else f" ({model.objective})")
    bpb = None if s["val_loss"] is None or not run.bytes_per_token else s["val_loss"] / math.log(2) / run.bytes_per_token
    return [run.name, base, run.tokenizer or "-", fmt(run.parameters, "{:,}"),
            f"{model.d_model} x {model.n_layers}" if model else "-",
            fmt(config.train.batch_tokens, "{:,}") if config else "-", fmt(s["steps"], "{:,}"),
            fmt(s["tokens"], "{:,}"), fmt(s["train_loss"], "{:.4f}"), fmt(s["val_loss"], "{:.4f}"),
            fmt(s["val_ppl"], "{:.2f}"), fmt(bpb, "{:.4f}"), fmt(s["tok_per_s"], "{:,.0f}"), fmt(s["mfu"], "{:.1%}"),
            fmt(s["peak_mem_gb"], "{:.2f}")]


def _suite_section(suite: Suite) -> str:
    info, system = suite.info, suite.system
    versions, device, cpu = system.get("versions", {}), system.get("device", {}), system.get("cpu", {})
    git = system.get("git") or {}
    facts = [["scale", info.get("scale")], ["command", info.get("command")], ["python", versions.get("python")],
             ["torch", versions.get("torch")], ["psann-lm", versions.get("psann-lm")],
             ["device", " ".join(str(v) for v in (device.get("type"), device.get("name")) if v)],
             ["CPU", f"{cpu.get('model')} ({cpu.get('usable_cores')} usable cores)"],
             ["git commit", f"{git.get('commit', '-')}{' (uncommitted changes)' if git.get('dirty') else ''}"],
             ["run at", system.get("time_utc")], ["suite time", fmt(info.get("elapsed_s"), "{:.0f} s")]]
    parts = [f"<h2>Bench suite: {esc(suite.name)}</h2>", f'<p class="note">{esc(info.get("scale_note", ""))}</p>',
             table(None, [[k, "-" if v is None else v] for k, v in facts])]
    if suite.throughput:
        rows = [[r.get("base"), fmt(r.get("batch_tokens"), "{:,.0f}"), fmt(r.get("parameters"), "{:,.0f}"),
                 fmt(r.get("tok_per_s"), "{:,.0f}"), fmt(r.get("tflops_per_device"), "{:.3f}"), fmt(r.get("mfu"), "{:.1%}"),
                 fmt(r.get("peak_mem_gb"), "{:.2f}"), r.get("dtype")] for r in suite.throughput]
        parts += ["<h3>Throughput (base x batch tokens)</h3>",
                  table(["base", "batch tokens", "params", "tok/s", "TFLOP/s", "MFU", "peak mem GB", "precision"], rows,
                        numeric={1, 2, 3, 4, 5, 6}),
                  f'<p class="note">{esc(info.get("throughput_note", ""))}</p>']
    if suite.memory.get("runs"):
        rows = [["on" if r.get("grad_checkpoint") else "off", fmt(r.get("saved_tensor_mb"), "{:,.1f}"), fmt(r.get("planned_activation_mb"),
                 "{:,.1f}"), fmt(r.get("cuda_peak_delta_mb"), "{:,.1f}")] for r in suite.memory["runs"]]
        parts += ["<h3>Memory of one micro-batch, with and without activation checkpointing</h3>",
                  table(["grad checkpoint", "saved for backward (MB)", "dry-run plan (MB)", "CUDA peak delta (MB)"], rows,
                        numeric={1, 2, 3}),
                  f'<p class="note">{esc(suite.memory.get("measured", ""))}</p>']
    return "\n".join(parts)


def _samples_section(samples: dict[str, list[tuple[str, str]]]) -> str:
    if not samples:
        return ""
    cards = []
    for name, pairs in samples.items():
        items = "".join(f'<div class="sample"><pre><span class="prompt">{esc(p)}</span>{esc(t)}</pre></div>'
                        for p, t in pairs)
        cards.append(f'<div class="card"><h3>{esc(name)}</h3>{items}</div>')
    return ('<h2>Samples</h2><p class="note">Greedy continuations (temperature 0, seed 0) from each run\'s final '
            "checkpoint; the prompt is in bold.</p>" + "".join(cards))


def render_report(runs: list[Run], suites: list[Suite], samples: dict[str, list[tuple[str, str]]] | None = None,
                  title: str = "psann-lm report", bpb_source: str | None = None) -> str:
    if not runs and not suites:
        raise DataError("nothing to report: no runs or suites were given.")
    parts = [f"<h1>{esc(title)}</h1>",
             f'<p class="meta">Generated {esc(datetime.now().strftime("%Y-%m-%d %H:%M"))} from '
             f"{len(runs)} run(s) and {len(suites)} bench suite(s).</p>"]
    curves = [(r.name, r.records) for r in runs if any(x.get("kind") == "train" for x in r.records)]
    plotted = {r.name: r for r in runs if (r.name, r.records) in curves}
    mixed = len({r.tokenizer for r in plotted.values()}) > 1
    per_byte = {n: r.bytes_per_token for n, r in plotted.items()} if mixed and all(
        r.bytes_per_token for r in plotted.values()) else None
    if curves:
        unit = (f"bits per byte: each run's nats/token / ln 2 / its tokenizer's bytes per token on {bpb_source}, "
                "since the runs' tokenizers differ" if per_byte else "nats/token")
        parts += ["<h2>Loss and perplexity</h2>",
                  f'<div class="card">{_image(curves_png(curves, per_byte), "loss and perplexity curves of every run")}</div>',
                  '<p class="note">Lines: training loss (mean over each logging window). Circles: validation loss. '
                  f"In {esc(unit)}. x axis: tokens seen, so runs with different batch sizes line up.</p>"]
        if mixed and not per_byte:
            parts.append('<p class="note">The runs use different tokenizers, so nats/token do not compare; give '
                         "--bpb-text FILE for bits per byte.</p>")
    if runs:
        bpb_note = (f" val BPB: validation nats/token / ln 2 / bytes per token of {bpb_source} under the run's "
                    "tokenizer, comparable across tokenizers." if bpb_source else "")
        parts += ["<h2>Runs</h2>", table(RUN_HEADER, [_run_row(r) for r in runs], numeric=set(range(3, 15))),
                  '<p class="note">tok/s and MFU: medians over logged windows after the first (warm-up). Peak memory: '
                  f"CUDA max allocated; on CPU the process's peak resident memory.{esc(bpb_note)}</p>",
                  table(["run", "directory"], [[r.name, str(r.path)] for r in runs])]
    parts += [_suite_section(s) for s in suites]
    parts.append(_samples_section(samples or {}))
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><main>\n{body}\n</main></body></html>\n")


def write_report(out: str | os.PathLike, runs: list[Run], suites: list[Suite],
                 samples: dict[str, list[tuple[str, str]]] | None = None, title: str = "psann-lm report",
                 bpb_source: str | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, render_report(runs, suites, samples, title, bpb_source))
