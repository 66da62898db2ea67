import dataclasses
import json
import math
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.config import ModelConfig, RunConfig, TrainConfig
from psann.lm.errors import CheckpointError, ConfigError
from psann.lm.models import build_model
from psann.lm.models.layers import Attention
from psann.lm.train import checkpoint as ckpt
from psann.lm.train.resume import latest_checkpoint, load_model_and_optimizer, load_training_state
from psann.lm.train.optim import lr_at
from psann.lm.train.plan import plan_batches
from psann.lm.train.run import with_run_dropout
from psann.lm.train.trainer import Trainer

TEXT = [f"the {a} {b} sat on the {c} mat number {i}." for i, (a, b, c) in
        enumerate([("red", "cat", "blue"), ("big", "dog", "green"), ("old", "owl", "soft")] * 30)]
TINY = dict(d_model=32, n_layers=2, n_heads=4)
FAST = dict(amp="fp32", progress=False, plot=False, log_interval_steps=1, eval_interval_steps=0, device="cpu")


@pytest.fixture(scope="module")
def dp():
    return psannLMDataPrep(TEXT, tokenizer="char", max_length=16, val_split=0.1, seed=0)


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(dp, tmp_path, optimizer):
    opts = dict(FAST, max_steps=8, batch_tokens=64, lr=3e-3, warmup_steps=2, optimizer=optimizer)
    psannLM(**TINY, dropout=0.1).fit(dp, checkpoint_dir=str(tmp_path / "a"), save_interval_steps=4, **opts)
    resumed = psannLM(**TINY, dropout=0.1)
    resumed.fit(dp, checkpoint_dir=str(tmp_path / "b"),
                resume_from=str(tmp_path / "a" / "checkpoints" / "step_0000004"), **opts)
    a, b = weights(tmp_path / "a/checkpoints/final"), weights(tmp_path / "b/checkpoints/final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    state = json.loads((tmp_path / "b/checkpoints/final/trainer_state.json").read_text())
    assert state["step"] == 8 and state["loader"]["consumed"] == 8 * 4


def test_grad_accumulation_matches_one_big_batch(dp, tmp_path):
    # SGD: Adam's first steps are sign-like and would amplify float noise in near-zero gradients.
    finals = []
    for name, split in (("big", dict(micro_batch_size=8)), ("acc", dict(grad_accum_steps=4))):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(tiny_model_config(dp), dropout=0.0))
        train = TrainConfig(**FAST, max_steps=3, batch_tokens=128, lr=0.5, warmup_steps=0,
                            checkpoint_dir=str(tmp_path / name), **split)
        trainer = Trainer(model, dp.tokenizer, RunConfig(data=dp.config, train=train), dp.train_windows)
        assert trainer.plan.windows_per_step == 8
        trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        trainer.fit()
        finals.append(weights(tmp_path / name / "checkpoints" / "final"))
    a, b = finals
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], build_model(tiny_model_config(dp)).state_dict()[k]) for k in a)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_batch(dp, tmp_path, caplog):
    finals = []
    for name, micro in (("auto", 8), ("small", 2)):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(dp))
        full_forward = model.forward

        def forward(x, **kw):
            if x.shape[0] > 2:  # what a too-large micro-batch does on a GPU
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return full_forward(x, **kw)

        model.forward = forward
        train = TrainConfig(**FAST, max_steps=3, batch_tokens=128, lr=3e-3, warmup_steps=0, micro_batch_size=micro,
                            checkpoint_dir=str(tmp_path / name))
        trainer = Trainer(model, dp.tokenizer, RunConfig(data=dp.config, train=train), dp.train_windows)
        trainer.fit()
        assert (trainer.plan.micro_batch_size, trainer.plan.grad_accum_steps) == (2, 4)
        finals.append(weights(tmp_path / name / "checkpoints" / "final"))
    assert "retrying with 4 x 2" in caplog.text and "retrying with 2 x 4" in caplog.text
    assert all(torch.allclose(finals[0][k], finals[1][k], atol=1e-6) for k in finals[0])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        model = build_model(tiny_model_config(dp))
        model.forward = forward
        train = TrainConfig(**FAST, max_steps=1, batch_tokens=128, micro_batch_size=8, auto_micro_batch=False,
                            checkpoint_dir=str(tmp_path / "off"))
        Trainer(model, dp.tokenizer, RunConfig(data=dp.config, train=train), dp.train_windows).fit()


def tiny_model_config(dp):
    return ModelConfig(**TINY, vocab_size=dp.vocab_size, max_seq_len=16)


def test_dropout_defaults_on_for_a_run_that_repeats_its_text(dp, tmp_path):
    n = len(dp.train_windows)

    def resolved(dropout=None, **train):
        return with_run_dropout(ModelConfig(**TINY, dropout=dropout), TrainConfig(**train), n, 16).dropout

    five_passes = math.ceil(5 * n / 8)  # batch_tokens=128 is 8 windows of 16 per step
    assert resolved(batch_tokens=128, max_steps=five_passes) == 0.1
    assert resolved(batch_tokens=128, max_steps=five_passes - 1) == 0.0
    assert resolved(epochs=5) == 0.1 and resolved(epochs=4.9) == 0.0
    assert resolved(max_tokens=5 * n * 16) == 0.1 and resolved(max_tokens=4 * n * 16) == 0.0
    assert resolved(dropout=0.0, epochs=10) == 0.0 and resolved(dropout=0.3, epochs=1) == 0.3  # a set value wins

    lm = psannLM(**TINY)
    lm.fit(dp, checkpoint_dir=str(tmp_path / "run"), epochs=5, batch_tokens=128, **FAST)
    saved = json.loads((tmp_path / "run/checkpoints/final/config.json").read_text())["config"]
    assert saved["model"]["dropout"] == 0.1  # the value it trained with, not "unset"
    assert {m.p for m in lm.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    assert saved["model"]["attention_dropout"] == 0.0  # the rule spares the fused attention kernel
    assert {m.dropout for m in lm.model.modules() if isinstance(m, Attention)} == {0.0}
    assert {m.dropout for m in build_model(dataclasses.replace(tiny_model_config(dp), dropout=0.2)).modules()
            if isinstance(m, Attention)} == {0.2}  # a dropout set by hand covers the attention weights, as before


def test_training_learns_and_writes_its_run_directory(dp, tmp_path):
    lm = psannLM(**TINY)
    run = tmp_path / "run"
    lm.fit(dp, checkpoint_dir=str(run), max_steps=60, batch_tokens=128, lr=1e-2, amp="fp32", progress=False,
           eval_interval_steps=30, log_interval_steps=10, device="cpu")
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    assert len(val) == 2 and val[-1]["val_loss"] < math.log(dp.vocab_size)
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("kind,step")
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert (run / "config.yaml").exists()
    for name in ("final", "best"):
        assert (run / "checkpoints" / name / "model.safetensors").exists()
    assert lm.last_run["best_val_loss"] <= val[-1]["val_loss"]


def test_interrupt_saves_a_resumable_checkpoint(dp, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Trainer._train_step

    def flaky(self, lr):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, lr)

    monkeypatch.setattr(Trainer, "_train_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path), max_steps=10, batch_tokens=64, **FAST)
    saved = latest_checkpoint(tmp_path)
    assert saved.name == "step_0000002"
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == 2


def test_schedule_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    lrs = [lr_at(s, cfg, 20, 4) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(20, cfg, 20, 4) == pytest.approx(0.1)


def test_linear_schedule_decays_in_equal_steps():
    cfg = TrainConfig(lr=1.0, min_lr=0.2, warmup_steps=2, lr_schedule="linear")
    lrs = [lr_at(s, cfg, 10, 2) for s in range(11)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[10] == pytest.approx(0.2)
    assert all(b - a == pytest.approx(-0.1) for a, b in zip(lrs[2:], lrs[3:]))
    assert lr_at(6, cfg, 10, 2) < lr_at(6, TrainConfig(lr=1.0, min_lr=0.2, warmup_steps=2), 10, 2)  # below cosine mid-run


def test_wsd_schedule_holds_lr_then_decays_over_the_last_fraction():
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=2, lr_schedule="wsd", decay_fraction=0.25)
    lrs = [lr_at(s, cfg, 20, 2) for s in range(21)]
    assert lrs[:2] == [0.5, 1.0] and set(lrs[2:16]) == {1.0}  # stable until step 15 = 20 - 0.25 * 20
    assert lrs[16:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    with pytest.raises(ConfigError, match="decay_fraction.*only applies"):
        TrainConfig(lr_schedule="cosine", decay_fraction=0.5)


def test_batch_plan():
    cpu = torch.device("cpu")
    plan = plan_batches(TrainConfig(batch_tokens=4096, grad_accum_steps=4), 128, 1000, cpu)
    assert (plan.windows_per_step, plan.micro_batch_size, plan.grad_accum_steps) == (32, 8, 4)
    plan = plan_batches(TrainConfig(batch_tokens=4096, epochs=2), 128, 1000, cpu)
    assert plan.total_steps == math.ceil(2 * 1000 / 32)
    plan = plan_batches(TrainConfig(batch_tokens=4096, max_tokens=40960), 128, 1000, cpu)
    assert plan.total_steps == 10
    with pytest.raises(ConfigError, match="smaller than one window"):
        plan_batches(TrainConfig(batch_tokens=100), 128, 1000, cpu)


def test_fit_rejects_unknown_options(dp):
    with pytest.raises(ConfigError, match="Did you mean 'warmup_steps'"):
        psannLM(**TINY).fit(dp, warmup_step=10)


def _tiny_checkpoint(dp, tmp_path):
    lm = psannLM(**TINY)
    lm.fit(dp, checkpoint_dir=str(tmp_path / "run"), max_steps=1, batch_tokens=64, **FAST)
    return tmp_path / "run" / "checkpoints" / "final"


def test_checkpoint_errors_are_clear(dp, tmp_path):
    final = _tiny_checkpoint(dp, tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        psannLM.load(tmp_path / "nope")
    (final / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        psannLM.load(final)
    meta = json.loads((final / "config.json").read_text())
    meta["format_version"] = 99
    (final / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format v99"):
        psannLM.load(final)
    (final / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        psannLM.load(final)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_never_unpickles_code(dp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    final = _tiny_checkpoint(dp, tmp_path)
    for name in ("optimizer.pt", "rng.pt"):
        with open(final / name, "wb") as fh:
            pickle.dump({"state": _Evil()}, fh)
    with pytest.raises(CheckpointError):
        load_training_state(final)
    model, _, _ = ckpt.load_checkpoint(final)
    with pytest.raises(CheckpointError):
        load_model_and_optimizer(final, model, torch.optim.AdamW(model.parameters()), sharded_model=False)
    assert not (tmp_path / "pwned_marker").exists()


def test_checkpoint_write_is_atomic(dp, tmp_path, monkeypatch):
    final = _tiny_checkpoint(dp, tmp_path)
    before = weights(final)
    model = build_model(ckpt.read_checkpoint_config(final).model)

    class Boom(Exception):
        pass

    def broken_save(self, directory):
        raise Boom

    tok = psannLM.load(final).tokenizer
    monkeypatch.setattr(type(tok), "save", broken_save)
    with pytest.raises(Boom):
        ckpt.save_checkpoint(final, model, tok, RunConfig.from_dict(json.loads((final / "config.json").read_text())["config"]))
    after = weights(final)
    assert all(torch.equal(before[k], after[k]) for k in before)  # old checkpoint intact
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]  # no temp left behind


def _first_train_loss(dp, tmp_path, name, **opts):
    lm = psannLM(**TINY)
    lm.fit(dp, checkpoint_dir=str(tmp_path / name), max_steps=1, batch_tokens=64, **{**FAST, **opts})
    return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])


def test_label_smoothing_and_eval_batches_are_honoured(dp, tmp_path):
    plain = _first_train_loss(dp, tmp_path, "plain")
    smooth = _first_train_loss(dp, tmp_path, "smooth", label_smoothing=0.5)
    assert smooth["loss"] != pytest.approx(plain["loss"], abs=1e-4)
    full = psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path / "e1"), max_steps=1, batch_tokens=64, **FAST)
    capped = psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path / "e2"), max_steps=1, batch_tokens=64,
                                 eval_batches=1, **FAST)
    assert capped.last_run["val_tokens"] < full.last_run["val_tokens"]


def test_parallel_settings_are_checked(dp, tmp_path, monkeypatch):
    kw = dict(checkpoint_dir=str(tmp_path), max_steps=1, batch_tokens=64, **{**FAST, "device": "cpu"})
    with pytest.raises(ConfigError, match="needs DDP"):
        psannLM(**TINY).fit(dp, optimizer="zero_adamw", **kw)
    with pytest.raises(ConfigError, match="applies to FSDP only"):
        psannLM(**TINY).fit(dp, fsdp_cpu_offload=True, **kw)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launch with torchrun"):
        psannLM(**TINY).fit(dp, **kw)


def test_other_optimizers_train_or_fall_back_with_a_message(dp, tmp_path, caplog):
    kw = dict(FAST, max_steps=2, batch_tokens=64, lr=1e-2)
    lm = psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path / "ada"), optimizer="adafactor", **kw)
    assert math.isfinite(lm.last_run["val_loss"])
    state = torch.load(tmp_path / "ada/checkpoints/final/optimizer.pt", weights_only=True)
    assert any(k.startswith("blocks.") for k in state["state"])  # keyed by parameter name
    psannLM(**TINY).fit(dp, checkpoint_dir=str(tmp_path / "b8"), optimizer="adamw8bit", **kw)
    assert "adamw8bit needs CUDA and bitsandbytes" in caplog.text and "Using AdamW" in caplog.text


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(dp):
    from psann.lm.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(tiny_model_config(dp))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    other = {names[id(p)] for g in optimizer.param_groups if not g["muon"] for p in g["params"]}
    assert muon and all(".attn." in n or ".mlp." in n for n in muon)  # qkv, out, gate_up, down of every block
    assert {"embed.weight"} <= other and all(n.endswith("norm.weight") or n == "embed.weight" or "lm_head" in n
                                            for n in other)
    x = dp.train_windows.batch([0, 1])[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # both halves stepped
    with pytest.raises(ConfigError, match="FSDP holds shards"):
        build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"), "fsdp")


def _train_losses(dp, run_dir, **options):
    torch.manual_seed(0)
    psannLM(**TINY).fit(dp, checkpoint_dir=str(run_dir), max_steps=3, batch_tokens=64, lr=3e-3, warmup_steps=0,
                        **FAST, **options)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_compiled_blocks_train_like_eager(dp, tmp_path):
    from torch._dynamo.utils import counters

    eager = _train_losses(dp, tmp_path / "eager")
    counters.clear()
    assert _train_losses(dp, tmp_path / "compiled", compile=True) == pytest.approx(eager, rel=1e-4)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks really ran as compiled graphs


def test_compile_failure_falls_back_to_eager_with_a_warning(dp, tmp_path, monkeypatch, caplog):
    eager = _train_losses(dp, tmp_path / "eager")

    def broken_compile(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("backend not available on this machine")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level("WARNING", logger="psann.lm"):
        assert _train_losses(dp, tmp_path / "fallback", compile=True) == pytest.approx(eager, rel=1e-6)
    assert "torch.compile failed (RuntimeError: backend not available" in caplog.text
