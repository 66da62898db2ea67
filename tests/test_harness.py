"""The lm-eval adapter (`--model psann`), its offline JSONL tasks and `psannlm eval harness`."""

import json
import logging
import math
import sys

import pytest
import torch

from conftest import SHARED_DATA
from psann.cli import main as cli
from psann.lm.config import GenerateConfig
from psann.lm.errors import ConfigError
from psann.lm.eval.loglik import encode_pair
from psann.lm.eval.mc import score_rows
from psann.lm.eval.tasks import offline_env, read_jsonl, write_task_dir
from psann.lm.objectives.causal import generate_tokens
from test_eval_mc import MC_ROWS, direct_logprob, save_tiny_checkpoint, write_mc
from test_eval_mc import one_thread  # noqa: F401  (its autouse fixture applies here too)

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from psann.lm.eval import harness  # noqa: E402
from psann.lm.eval.harness import PsannLM, lm_eval_argv  # noqa: E402

PPL_TEXTS = ["little tom went to the market and bought 3 apples. little ann went to the market too.",
             "little ann went home.", ("tom bought 12 apples and went home to ann. " * 3).strip()]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "c")


@pytest.fixture(scope="module")
def lm(ckpt):
    return PsannLM(ckpt=ckpt, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    mc = write_mc(root / "toy_mc.jsonl", MC_ROWS * 2)
    ppl = root / "toy_ppl.jsonl"
    ppl.write_text("".join(json.dumps({"text": t}) + "\n" for t in PPL_TEXTS), encoding="utf-8")
    return {"mc": f"toy_mc={mc}", "ppl": f"toy_ppl={ppl}", "root": root}


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_is_the_direct_sum_for_any_batch_size(lm):
    tok = lm.tokenizer
    pairs = [("little tom went to the", " market"), ("little ann", " went home."), ("", "tom"), ("bought 3", " apples.")]
    expected = []
    for context, continuation in pairs:
        c, x = encode_pair(tok, context, continuation)
        expected.append(direct_logprob(lm.scorer.model, c + x, len(x)))
    for batch_size in (1, 3):
        lm.batch_size = batch_size
        got = lm.loglikelihood(requests("loglikelihood", pairs))
        assert [ll for ll, _ in got] == pytest.approx(expected, abs=1e-4)
        assert all(isinstance(g, bool) for _, g in got)
    lm.batch_size = 4


def test_generate_until_stops_at_until_and_max_gen_toks(lm, caplog):
    tok, model = lm.tokenizer, lm.scorer.model
    context = "little tom went to the"
    prompt = [[tok.bos_id, *tok.encode(context)]]
    ids = generate_tokens(model, prompt, GenerateConfig(max_new_tokens=12, temperature=0), eos_id=tok.eos_id,
                          pad_id=tok.pad_id, max_seq_len=lm.max_length)[0]
    full, short = tok.decode(ids), tok.decode(ids[:4])
    assert len(full) > 6
    stop = full[3:5]
    out = lm.generate_until(requests("generate_until", [
        (context, {"max_gen_toks": 12, "until": []}),
        (context, {"max_gen_toks": 4, "until": []}),
        (context, {"max_gen_toks": 12, "until": [stop]}),
        ("little ann", {"max_gen_toks": 12, "until": [stop]}),
    ]))
    assert out[:3] == [full, short, full[:full.index(stop)]]
    assert stop not in out[3]
    # lm-eval's sampling flags: greedy unless do_sample (temperature 0 with do_sample false is greedy, not ignored)
    greedy = {"max_gen_toks": 12, "until": [], "do_sample": False, "temperature": 0.0}
    sampled = [lm.generate_until(requests("generate_until", [(context, {**greedy, "do_sample": True, "temperature": 5.0,
                                                                        "seed": seed})]))[0]
               for seed in range(4)]
    with caplog.at_level(logging.WARNING, logger="psann.lm"):
        assert lm.generate_until(requests("generate_until", [(context, greedy)]))[0] == full
    assert "ignored" not in caplog.text and len(set(sampled)) > 1
    # a temperature alone samples, and max_new_tokens is lm-eval's alias of max_gen_toks
    alone = [lm.generate_until(requests("generate_until", [(context, {"until": [], "temperature": 5.0, "seed": seed})]))[0]
             for seed in range(4)]
    assert len(set(alone)) > 1
    assert lm.generate_until(requests("generate_until", [(context, {"until": [], "max_new_tokens": 4})]))[0] == short


def test_model_args_win_over_lm_evals_device_and_batch_size(ckpt):
    # lm-eval passes its --device/--batch_size (defaults included) beside model_args
    lm = PsannLM.create_from_arg_string(f"ckpt={ckpt},device=cpu,batch_size=2", {"device": "auto", "batch_size": 1})
    assert lm.batch_size == 2 and str(lm._device) == "cpu"
    lm = PsannLM.create_from_arg_obj({"ckpt": ckpt}, {"device": "cpu", "batch_size": 3, "max_batch_size": None})
    assert lm.batch_size == 3


def test_batch_size_auto_halves_until_a_batch_fits(ckpt, monkeypatch):
    lm = PsannLM(ckpt=ckpt, device="cpu", batch_size="auto", max_batch_size=16)
    assert lm.batch_size == 16  # nothing runs out of memory on this tiny model
    model = lm.scorer.model
    calls, forward = [], type(model).forward

    def limited(self, x, *args, **kwargs):  # an accelerator that holds at most 5 windows
        calls.append(tuple(x.shape))
        if x.shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", limited)
    width = model.config.max_seq_len  # probes use the full context: the longest windows come first
    assert lm.scorer.find_batch_size(64) == 4 and calls == [(n, width) for n in (64, 32, 16, 8, 4)]
    monkeypatch.setattr(type(model), "forward", lambda self, x, *a, **k: (_ for _ in ()).throw(
        RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    with pytest.raises(ConfigError, match="does not fit in memory"):
        lm.scorer.find_batch_size(2)
    with pytest.raises(ConfigError, match="auto:4"):
        PsannLM(ckpt=ckpt, device="cpu", batch_size="auto:4")


def test_chat_template_and_names(lm):
    history = [{"role": "user", "content": "where did tom go?"}]
    rendered = lm.apply_chat_template(history)
    assert rendered == lm.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|user|>") and rendered.endswith("<|assistant|>")
    assert lm.chat_template(True) == lm.tokenizer.chat_template
    assert lm.tokenizer_name.startswith("psann-bpe-")
    context, _ = encode_pair(lm.tokenizer, rendered, " to the market")  # role markers are single ids
    assert lm.tokenizer.special_token_ids["<|user|>"] in context


def test_byte_and_diffusion_checkpoints(tmp_path, caplog):
    byte = PsannLM(ckpt=save_tiny_checkpoint(tmp_path / "b", tokenizer="byte", base="byte", n_heads=2), device="cpu")
    [(ll, _)] = byte.loglikelihood(requests("loglikelihood", [("tom went to the", " market")]))
    c, x = encode_pair(byte.tokenizer, "tom went to the", " market")
    assert ll == pytest.approx(direct_logprob(byte.scorer.model, c + x, len(x)), abs=1e-4) and not byte.is_bound
    assert isinstance(byte.generate_until(requests("generate_until", [("tom", {"max_gen_toks": 5})]))[0], str)

    with caplog.at_level(logging.WARNING, logger="psann.lm"):
        diffusion = PsannLM(ckpt=save_tiny_checkpoint(tmp_path / "d", tokenizer="char", objective="diffusion"),
                            device="cpu", mc_draws=3)
    assert diffusion.is_bound and "Monte-Carlo lower bounds" in caplog.text
    [(bound, _)] = diffusion.loglikelihood(requests("loglikelihood", [("tom went to the", " market")]))
    assert bound < 0
    with caplog.at_level(logging.WARNING, logger="psann.lm"):
        [text] = diffusion.generate_until(requests("generate_until", [("tom", {"max_gen_toks": 400, "until": ["e"]})]))
    assert "generating 24" in caplog.text and "e" not in text and len(text) <= 24  # char tokens: one per char


def test_main_builds_the_lm_eval_command(ckpt, task_files, capsys):
    assert harness.main(["--ckpt", ckpt, "--mc-file", task_files["mc"], "--num-fewshot", "2",
                         "--apply-chat-template", "--print-config"]) == 0
    argv = json.loads(capsys.readouterr().out)["lm_eval_run"]
    assert argv[:3] == ["--num_fewshot", "2", "--apply_chat_template"]
    assert argv[argv.index("--model") + 1] == "psann" and argv[argv.index("--tasks") + 1] == "toy_mc"
    assert json.loads(argv[argv.index("--model_args") + 1]) == {"ckpt": ckpt}
    assert argv[argv.index("--device") + 1] == "auto" and argv[argv.index("--batch_size") + 1] == "8"
    with pytest.raises(ConfigError, match="include_path"):
        lm_eval_argv(["--include_path", "x"], ckpt, "/tmp/tasks", ["toy_mc"])


def test_model_args_are_checked(ckpt):
    with pytest.raises(ConfigError, match="mc_draw"):
        PsannLM(ckpt=ckpt, mc_draw=4)
    with pytest.raises(ConfigError, match="ckpt=DIR"):
        PsannLM(device="cpu")


def test_bad_task_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 5}\n')
    assert cli(["eval", "harness", "--ckpt", "x", "--mc-file", f"bad={bad}"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_missing_lm_eval_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "psann.lm.eval.harness")
    assert cli(["eval", "harness", "--tasks", "x"]) == 2
    assert "pip install 'psann-lm[eval]'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def evaluated(lm, task_files, tmp_path_factory):
    """One simple_evaluate over the offline MC and perplexity tasks (built-in tasks not indexed)."""
    offline_env()
    include = tmp_path_factory.mktemp("include")
    names = write_task_dir(include, {"mc": [task_files["mc"]], "ppl": [task_files["ppl"]]})
    return simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(include),
                                                                          include_defaults=False))


def test_simple_evaluate_mc_agrees_with_eval_mc(evaluated, lm):
    result = evaluated["results"]["toy_mc"]
    expected = score_rows(lm.scorer, MC_ROWS * 2, batch_size=3)
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert result[f"{metric},none"] == pytest.approx(expected[metric])


def test_simple_evaluate_perplexity_metrics(evaluated, lm):
    result = evaluated["results"]["toy_ppl"]
    total = sum(lm.scorer.loglikelihood_rolling(PPL_TEXTS, batch_size=2))
    words = sum(len(t.split()) for t in PPL_TEXTS)
    nbytes = sum(len(t.encode()) for t in PPL_TEXTS)
    assert result["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert result["byte_perplexity,none"] == pytest.approx(math.exp(-total / nbytes), rel=1e-4)
    assert result["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)


def test_harness_cli_with_chat_template(ckpt, task_files, tmp_path):
    """The user's path: lm-eval's own CLI (it indexes every built-in task: ~10 s)."""
    out = tmp_path / "out"
    assert cli(["eval", "harness", "--ckpt", ckpt, "--device", "cpu", "--mc-file", task_files["mc"], "--limit", "3",
                "--batch-size", "4", "--apply-chat-template", "--log-samples", "--output-path", str(out)]) == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"]["toy_mc"]["acc,none"] is not None and results["config"]["limit"] == 3
    samples = [json.loads(line) for line in next(out.rglob("samples_toy_mc_*.jsonl")).read_text().splitlines()]
    assert len(samples) == 3
    context = samples[0]["arguments"]["gen_args_0"]["arg_0"]
    assert context.startswith("<|user|>") and "<|assistant|>" in context and MC_ROWS[0]["query"] in context


def test_shared_arc_easy_with_limit(lm, tmp_path):
    data = SHARED_DATA / "eval" / "arc_easy.jsonl"
    if not data.exists():
        pytest.skip("needs ../shared/data/eval/arc_easy.jsonl (not present in this checkout)")
    offline_env()
    names = write_task_dir(tmp_path, {"mc": [f"arc_easy_local={data}"]})
    out = simple_evaluate(model=lm, tasks=names, limit=12,
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    expected = score_rows(lm.scorer, read_jsonl(data, "mc")[:12], batch_size=8)
    assert out["results"]["arc_easy_local"]["acc,none"] == pytest.approx(expected["acc"])
    assert out["results"]["arc_easy_local"]["acc_norm,none"] == pytest.approx(expected["acc_norm"])
