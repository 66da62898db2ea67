"""`psannlm bench suite` and `psannlm report`: the files the suite writes, the HTML page built from runs."""

import base64
import contextlib
import csv
import html
import io
import json
import re
import shutil
import subprocess

import pytest
import torch

from psann.cli import main
from psann.lm import psannLM, psannLMDataPrep
from psann.lm.errors import DataError
from psann.lm.report.html import load_inputs, render_report
from psann.lm.train.metrics import summarize_metrics

HOSTILE = '<script>alert("x") & \'run\''  # a directory name: no slash
TINY_SUITE = ["--scale", "cpu", "--device", "cpu", "--corpus-bytes", "60000", "--d-model", "32", "--n-layers", "1",
              "--steps", "6", "--baseline-batch-tokens", "512", "--bases", "transformer,respsann",
              "--batch-tokens", "256", "--grid-steps", "2"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "suite"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["bench", "suite", "--out", str(out), *TINY_SUITE]) == 0
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / HOSTILE
    texts = [f"the {w} sat on the mat {n} times." for n in range(30) for w in ("cat", "dog")]
    dp = psannLMDataPrep(texts, tokenizer="char", max_length=32, val_split=0.1)
    psannLM(d_model=32, n_layers=1, n_heads=4).fit(dp, max_steps=4, batch_tokens=128, lr=1e-2, amp="fp32",
                                                   progress=False, log_interval_steps=1, eval_interval_steps=2,
                                                   checkpoint_dir=str(run))
    return run


def test_suite_writes_every_part_and_states_its_scale(suite):
    out, stdout = suite
    assert stdout.splitlines()[0].startswith("bench suite: CPU scale (tiny): d_model 32 x 1 layers")
    info = json.loads((out / "suite.json").read_text())
    assert info["scale"] == "cpu" and info["settings"]["steps"] == 6 and "--steps 6" in info["command"]

    jsonl = [json.loads(line) for line in (out / "baseline" / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["records"] == jsonl and metrics["summary"]["steps"] == 6
    assert metrics["summary"]["val_loss"] == [r for r in jsonl if r["kind"] == "val"][-1]["val_loss"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == len(jsonl) and float(rows[0]["loss"]) == pytest.approx(jsonl[0]["loss"])
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")

    grid = list(csv.DictReader((out / "throughput.csv").open()))
    assert [(r["base"], r["batch_tokens"]) for r in grid] == [("transformer", "256"), ("respsann", "256")]
    assert all(float(r["tok_per_s"]) > 0 and r["peak_mem_gb"] == "" for r in grid)  # no honest CPU peak per cell
    assert not (out / ".grid").exists()

    memory = json.loads((out / "memory.json").read_text())
    plain, checkpointed = memory["runs"]
    assert (plain["grad_checkpoint"], checkpointed["grad_checkpoint"]) == (False, True)
    assert 0 < checkpointed["saved_tensor_mb"] < plain["saved_tensor_mb"]
    assert plain["wall_s"] > 0 and checkpointed["wall_s"] > 0  # BMRK-03: memory with its wall time
    assert memory["micro_batch"]["tokens"] == 512 and "parameters excluded" in memory["measured"]

    system = json.loads((out / "system.json").read_text())
    assert system["versions"]["torch"] == torch.__version__
    assert system["device"]["type"] == "cpu" and system["cpu"]["logical_cores"] >= 1
    git = system["git"]
    assert git is None or re.fullmatch(r"[0-9a-f]{40}", git["commit"])


@pytest.mark.parametrize("args, message", [
    (["--bases", "byte"], "reads raw bytes"),
    (["--bases", "transfomer"], "unknown base 'transfomer'"),
    (["--batch-tokens", "64"], "less than one 128-token window"),
    (["--grid-steps", "1"], "--grid-steps must be at least 2"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--d-model", "30"], "multiple of the 4 attention heads"),
])
def test_suite_rejects_bad_settings(args, message, capsys):
    assert main(["bench", "suite", "--scale", "cpu", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_suite_refuses_to_overwrite_a_suite(suite, capsys):
    assert main(["bench", "suite", "--out", str(suite[0]), *TINY_SUITE]) == 2
    assert "already holds a suite" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_suite_gpu_scale_needs_cuda(capsys):
    assert main(["bench", "suite", "--scale", "gpu"]) == 2
    assert "--scale gpu needs a CUDA device" in capsys.readouterr().err


def test_suite_print_config_resolves_the_scale(capsys):
    assert main(["bench", "suite", "--device", "cpu", "--steps", "7", "--print-config"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["scale"] == "cpu" and settings["steps"] == 7 and settings["bases"] == ["transformer", "respsann"]


def _section(page: str, heading: str) -> str:
    start = page.index(f"<h2>{heading}")
    end = page.find("<h2>", start + 1)
    return page[start:end if end > 0 else None]


def test_report_compares_runs_and_escapes_names(suite, hostile_run, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(suite[0]), str(hostile_run), "--out", str(out), "--max-new-tokens", "6"]) == 0
    page = out.read_text(encoding="utf-8")

    assert HOSTILE not in page and "<script" not in page  # the hostile name arrives escaped, everywhere
    assert html.escape(HOSTILE) in page and "suite/baseline" in page
    runs = _section(page, "Runs")
    first_table = runs[:runs.index("</table>")]
    assert first_table.count("<tr>") == 1 + 2  # header + one row per run
    assert re.search(r"https?://", page) is None and "<link" not in page
    images = re.findall(r'src="([^"]*)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[0].split(",", 1)[1]).startswith(b"\x89PNG")

    suite_part = _section(page, "Bench suite")
    assert "respsann" in suite_part and "saved for backward" in suite_part and "CPU scale (tiny)" in suite_part
    samples = _section(page, "Samples")
    assert samples.count("Once upon a time") == 2 and html.escape(HOSTILE) in samples


def test_report_without_samples_and_bad_inputs(hostile_run, tmp_path, capsys):
    out = tmp_path / "plain.html"
    assert main(["report", str(hostile_run), "--no-samples", "--out", str(out)]) == 0
    assert "<h2>Samples" not in out.read_text()

    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "neither a run directory" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(hostile_run, broken)
    with open(broken / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step"\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:\d+ is not valid JSON"):
        load_inputs([str(broken)])


def test_summarize_metrics_skips_the_warm_up_window():
    records = [{"kind": "train", "step": 1, "tokens": 10, "loss": 3.0, "tok_per_s": 1.0, "peak_mem_gb": 0.5},
               {"kind": "train", "step": 2, "tokens": 20, "loss": 2.0, "tok_per_s": 100.0, "peak_mem_gb": 0.7},
               {"kind": "val", "step": 2, "val_loss": 2.5, "val_ppl": 12.2},
               {"kind": "train", "step": 3, "tokens": 30, "loss": 1.5, "tok_per_s": 120.0, "peak_mem_gb": 0.6},
               {"kind": "val", "step": 3, "val_loss": 2.6, "val_ppl": 13.5}]
    s = summarize_metrics(records)
    assert s["tok_per_s"] == 110.0 and s["train_loss"] == 1.5 and s["tokens"] == 30 and s["peak_mem_gb"] == 0.7
    assert (s["val_loss"], s["val_ppl"], s["best_val_loss"]) == (2.6, 13.5, 2.5) and s["mfu"] is None
    with pytest.raises(DataError, match="nothing to report"):
        render_report([], [])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium for the screenshot")
def test_report_renders_in_a_headless_browser(suite, hostile_run, tmp_path):
    out, shot = tmp_path / "report.html", tmp_path / "report.png"
    assert main(["report", str(suite[0]), str(hostile_run), "--no-samples", "--out", str(out)]) == 0
    subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2000", out.as_uri()], check=True, capture_output=True, timeout=120)
    png = shot.read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 2000) and len(png) > 50_000  # a page with content, not a blank one


def test_runs_with_different_tokenizers_compare_in_bits_per_byte(hostile_run, tmp_path):
    import math

    from psann.lm.report.html import measure_bytes_per_token
    from psann.lm.tokenizers import load_tokenizer

    texts = [f"the {w} sat on the mat {n} times." for n in range(30) for w in ("cat", "dog")]
    byte_run = tmp_path / "bytes"
    dp = psannLMDataPrep(texts, tokenizer="byte", max_length=32, val_split=0.1)
    psannLM(d_model=32, n_layers=1, n_heads=4).fit(dp, max_steps=2, batch_tokens=128, lr=1e-2, amp="fp32",
                                                   progress=False, log_interval_steps=1, eval_interval_steps=2,
                                                   checkpoint_dir=str(byte_run))
    sample = tmp_path / "sample.txt"
    sample.write_text("\n".join(texts[:20]), encoding="utf-8")
    out = tmp_path / "mixed.html"
    assert main(["report", str(hostile_run), str(byte_run), "--no-samples", "--bpb-text", str(sample),
                 "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert "In bits per byte" in page and html.escape(str(sample)) in page
    runs, _ = load_inputs([str(hostile_run), str(byte_run)])
    measure_bytes_per_token(runs, str(sample))
    char_run = runs[0]
    tok = load_tokenizer(char_run.checkpoint / "tokenizer")
    text = sample.read_text(encoding="utf-8")
    assert char_run.bytes_per_token == len(text.encode()) / len(tok.encode(text)) and runs[1].bytes_per_token == 1.0
    rows = _section(page, "Runs")
    val = summarize_metrics(char_run.records)["val_loss"]
    assert f"{val / math.log(2) / char_run.bytes_per_token:.4f}" in rows  # its val BPB
    assert f"char {tok.vocab_size:,}" in rows and "byte 256" in rows  # the tokenizer per run
    assert main(["report", str(hostile_run), "--no-samples", "--bpb-text", str(tmp_path / "nope.txt"),
                 "--out", str(out)]) == 2
