"""Byte-level models: flat byte LM and H-Net, with Transformer and HGRN-Bit blocks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.config import ModelConfig, gated_mlp_hidden, load_config
from psann.lm.errors import ConfigError
from psann.lm.models import build_model, check_model_config, count_parameters
from psann.lm.models.hgrn_bit import BitLinear, quantize_activations, quantize_weights
from psann.lm.models.hnet import chunk, dechunk, ratio_loss
from psann.lm.models.scan import linear_scan, naive_linear_scan
from psann.lm.objectives import causal_lm_loss_sum
from psann.lm.tokenizers.byte import BOS_ID
from psann.lm.train.optim import parameter_groups

CONFIGS = Path(__file__).parents[1] / "examples/lm/configs"
SMALL = {
    "byte-transformer": dict(base="byte", d_model=32, n_layers=2, n_heads=2),
    "byte-hgrn": dict(base="byte", d_model=32, n_layers=2, n_heads=2, layer_type="hgrn_bit"),
    "hnet-transformer": dict(base="hnet", d_model=[32, 48], num_blocks=[[1, 0, 1], [2]], n_heads=2),
    "hnet-hgrn": dict(base="hnet", d_model=[32, 48], num_blocks=[[1, 0, 1], [2]], n_heads=2, layer_type="hgrn_bit"),
    "hnet-2stage": dict(base="hnet", d_model=[16, 32, 48], num_blocks=[[1, 0, 1], [1, 0, 1], [1]], n_heads=2),
}


def small_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**SMALL[name], vocab_size=256, max_seq_len=96)).eval()
    with torch.no_grad():  # a trained-looking router and residual: chunks of varied length
        for m in model.modules():
            if hasattr(m, "router"):
                m.router.q.weight.normal_(std=1.0)
                m.residual_proj.weight.normal_(std=0.05)
    return model


def random_bytes(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(32, 127, (batch, length), generator=g)
    x[:, 0] = BOS_ID
    x[0, length // 2] = BOS_ID  # a packed document start mid-row
    return x


# -- labels ----------------------------------------------------------------------------------------
def test_labels_are_shifted_exactly_once():
    dp = psannLMDataPrep(["the quick brown fox jumps over the lazy dog. " * 20], tokenizer="byte", max_length=32,
                         val_split=0.0)
    # full windows (the last is padded after the final EOS, which its inputs cannot show)
    x, y = dp.train_windows.batch(torch.arange(len(dp.train_windows) - 1).numpy())
    keep = y.clone()
    keep[:, -1] = -100  # the oracles below see only the window, so they cannot guess its last target

    def oracle(ahead: int) -> torch.Tensor:  # logits that put all mass on the byte `ahead` positions on
        target = torch.roll(x, -ahead, dims=1)
        return F.one_hot(target, 256).float() * 100.0

    copies_next, _ = causal_lm_loss_sum(oracle(1), keep)
    keep[:, -2] = -100
    copies_after, _ = causal_lm_loss_sum(oracle(2), keep)
    assert float(copies_next) == pytest.approx(0.0, abs=1e-6)
    assert float(copies_after) > 100.0


# -- structure -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL)
def test_every_configuration_is_causal(name):
    model, x = small_model(name), random_bytes(3, 64)
    changed = x.clone()
    changed[:, 40:] = random_bytes(3, 24, seed=7)
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


@pytest.mark.parametrize("name", SMALL)
def test_incremental_decoding_equals_the_full_forward(name, monkeypatch):
    # BitLinear's rounding turns float noise of 1e-7 into a whole int8 step now and then, so the
    # cache logic is checked exactly with quantisation off, then loosely with it on.
    monkeypatch.setattr(BitLinear, "quantize", False)
    model, x = small_model(name), random_bytes(3, 64)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 96)
        prefix = model(x[:, :10], cache=cache)  # a prompt prefill, then one byte at a time
        steps = torch.cat([prefix] + [model(x[:, t:t + 1], cache=cache) for t in range(10, 64)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    if "hgrn" in name:
        monkeypatch.setattr(BitLinear, "quantize", True)
        with torch.no_grad():
            full = model(x)
            cache = model.new_cache(3, 96)
            steps = torch.cat([model(x[:, t:t + 1], cache=cache) for t in range(64)], dim=1)
        close = (steps - full).abs().amax(-1) < 1e-4
        assert close.float().mean() > 0.8
        assert (steps.argmax(-1) == full.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("name", ["byte-hgrn", "hnet-transformer", "hnet-2stage"])
def test_left_padded_batches_equal_single_rows(name, monkeypatch):
    monkeypatch.setattr(BitLinear, "quantize", False)
    model = small_model(name)
    rows = [random_bytes(1, n, seed=n)[0] for n in (20, 33, 9)]
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), 0xFD)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            torch.testing.assert_close(batched[i, width - len(r):], model(r[None])[0], atol=1e-5, rtol=1e-5)


def test_dechunk_of_chunk_is_identity_when_every_position_is_a_boundary():
    h = torch.randn(2, 17, 8)
    starts = torch.ones(2, 17, dtype=torch.bool)
    chunks, index = chunk(h, starts)
    assert torch.equal(chunks, h)
    torch.testing.assert_close(dechunk(chunks, torch.ones(2, 17), starts, index), h, atol=2e-3, rtol=1e-3)


def test_chunk_keeps_start_positions_in_order_and_dechunk_fills_each_chunk():
    h = torch.arange(6.0).view(1, 6, 1).repeat(2, 1, 1)
    starts = torch.tensor([[1, 0, 0, 1, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    chunks, index = chunk(h, starts)
    assert index[0].tolist() == [0, 3, 5] and index[1, :2].tolist() == [0, 1]
    up = dechunk(chunks, torch.ones(2, 6), starts, index)[0, :, 0]
    assert up.tolist() == pytest.approx([0, 0, 0, 3, 3, 5], abs=1e-3)  # P ~ 1: each position reads its chunk


def test_ratio_loss_is_smallest_at_the_target_compression():
    n = 6.0
    grid = torch.linspace(0.02, 0.98, 49)
    losses = torch.stack([ratio_loss(torch.tensor([f]), torch.tensor([f]), n) for f in grid])
    best = grid[losses.argmin()]
    assert abs(float(best) - 1 / n) < 0.02
    assert float(ratio_loss(torch.tensor([1 / n]), torch.tensor([1 / n]), n)) == pytest.approx(1.0)


def test_router_and_encoder_receive_gradient_through_the_straight_through_estimator():
    model = small_model("hnet-transformer").train()
    logits, aux = model(random_bytes(2, 48), return_aux=True)
    (logits.logsumexp(-1).mean() + aux["loss"]).backward()
    router = model.stage.router
    assert router.q.weight.grad.abs().sum() > 0 and router.k.weight.grad.abs().sum() > 0
    assert set(aux["metrics"]) == {"stage0_ratio_loss", "stage0_compression"}
    assert float(aux["metrics"]["stage0_compression"]) > 1


@pytest.mark.parametrize("name", ["byte-hgrn", "hnet-2stage", "hnet-hgrn"])
def test_activation_checkpointing_of_every_block_gives_the_same_gradients(name):
    import copy

    from psann.lm.train.parallel import apply_activation_checkpointing

    model = small_model(name).train()
    twin = copy.deepcopy(model)
    assert apply_activation_checkpointing(twin) == len(list(model.blocks)) > 0
    x = random_bytes(2, 48)
    for m in (model, twin):
        out = m(x, return_aux=True) if name.startswith("hnet") else (m(x), None)
        loss = F.cross_entropy(out[0].flatten(0, 1), x.roll(-1, 1).flatten())
        (loss + out[1]["loss"] if out[1] else loss).backward()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert a.grad is not None, n  # every parameter, the router and pads included, is trained
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=n)


# -- the scan and BitLinear --------------------------------------------------------------------------
def test_scan_equals_the_naive_loop_in_values_and_gradients():
    torch.manual_seed(0)
    f = torch.rand(3, 50, 8, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 50, 8, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 50, 8, dtype=torch.float64)
    fast = torch.autograd.grad((linear_scan(f, u, h0).double() * weights).sum(), (f, u, h0))
    naive = torch.autograd.grad((naive_linear_scan(f, u, h0) * weights).sum(), (f, u, h0))
    torch.testing.assert_close(linear_scan(f, u, h0).double(), naive_linear_scan(f, u, h0), atol=1e-5, rtol=1e-5)
    for a, b in zip(fast, naive):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_bitlinear_weights_are_ternary_and_activations_int8_with_identity_gradients():
    w = torch.randn(16, 32)
    q = quantize_weights(w)
    scale = w.abs().mean()
    assert set((q / scale).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    x = torch.randn(4, 32)
    levels = quantize_activations(x) * 127 / x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    layer = BitLinear(32, 16, 1e-6)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad.abs().sum() > 0


# -- configs, counts, training -------------------------------------------------------------------
def hgrn_block_parameters(d: int, heads: int = 1) -> int:
    m = gated_mlp_hidden(d, 4.0)
    mixer = 3 * (d * d + d) + d // heads + (d * d + d)  # i/f/g and out BitLinears (weight + input norm), g_norm
    mlp = (2 * m * d + d) + (m * d + m)
    return 2 * d + mixer + mlp  # + the two block norms


@pytest.mark.parametrize("name", ["slm_base", "hnet_bit_1stage", "hnet_bit_2stage"])
def test_seed_json_configs_build_with_the_printed_parameter_counts(name, capsys):
    from psann.lm.train.cli import main

    cfg = load_config(CONFIGS / f"{name}.json").model
    widths = cfg.widths
    expected = 256 * widths[0] + widths[0]  # tied embedding/head, final norm
    if cfg.base == "byte":
        expected += cfg.n_layers * hgrn_block_parameters(cfg.d_model)
    else:
        for level, (d, blocks) in enumerate(zip(widths, cfg.num_blocks)):
            expected += sum(blocks) * hgrn_block_parameters(d)
            if level < len(widths) - 1:
                expected += 3 * d * d + (widths[level + 1] - d)  # router q/k, residual projection, pad
    with torch.device("meta"):
        model = build_model(cfg)
    assert count_parameters(model) == expected
    assert main(["--config", str(CONFIGS / f"{name}.json"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["parameters"] == expected


def test_the_issue_config_loads_as_json_and_yaml(tmp_path):
    seed = {"model_type": "hnet_bit", "vocab_size": 256, "d_model": [384, 512, 768],
            "num_blocks": [[3, 0, 3], [3, 0, 3], [6]], "num_heads": 1, "expand_ratio": 1, "hidden_ratio": 4,
            "attn_mode": "fused_recurrent", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    (tmp_path / "ours.yaml").write_text("model:\n  base: hnet\n  layer_type: hgrn_bit\n  d_model: [384, 512, 768]\n"
                                        "  num_blocks: [[3, 0, 3], [3, 0, 3], [6]]\n  n_heads: 1\n  vocab_size: 256\n"
                                        "  max_seq_len: 2048\n  norm_eps: 1.0e-6\n")
    a, b = load_config(tmp_path / "seed.json").model, load_config(tmp_path / "ours.yaml").model
    assert a == b and a.compression_targets == [3.0, 3.0]
    (tmp_path / "bad.json").write_text(json.dumps({**seed, "num_block": 3}))
    with pytest.raises(ConfigError, match="unknown key 'num_block'.*num_blocks"):
        load_config(tmp_path / "bad.json")


@pytest.mark.parametrize("kwargs, message", [
    (dict(base="hnet", d_model=[32, 48]), "num_blocks"),
    (dict(base="hnet", d_model=[32, 48], num_blocks=[[1, 1, 1], [2]]), r"\[encoder, 0, decoder\]"),
    (dict(base="hnet", d_model=[48, 32], num_blocks=[[1, 0, 1], [2]]), "must not shrink"),
    (dict(base="hnet", d_model=[32, 48], num_blocks=[[1, 0, 1], [2]], n_layers=4), "remove model.n_layers"),
    (dict(base="hnet", d_model=[32, 48], num_blocks=[[1, 0, 1], [2]], target_compression=[1.0]), "> 1"),
    (dict(base="byte", num_blocks=[[1, 0, 1], [2]]), "only applies to base 'hnet'"),
    (dict(base="transformer", layer_type="hgrn_bit"), "byte-level bases"),
    (dict(base="byte", d_model=[32, 48]), "takes one integer"),
])
def test_bad_byte_configs_name_the_key_and_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        check_model_config(ModelConfig(**kwargs))


def test_byte_bases_refuse_a_subword_tokenizer():
    dp = psannLMDataPrep(["some text to train on. " * 30], tokenizer="char", max_length=16)
    with pytest.raises(ConfigError, match="tokenizer='byte'"):
        psannLM(base="byte", d_model=32, n_layers=1, n_heads=2).fit(dp, max_steps=1)


def test_stage_learning_rate_multipliers_reach_the_optimizer():
    model = build_model(ModelConfig(**SMALL["hnet-transformer"], stage_lr_mult=[3.0, 0.5], vocab_size=256,
                                    max_seq_len=32))
    mult = {id(p): g["lr_mult"] for g in parameter_groups(model, 0.1) for p in g["params"]}
    assert mult[id(model.embed.weight)] == 3.0 and mult[id(model.stage.router.q.weight)] == 3.0
    assert mult[id(model.stage.encoder.blocks[0].attn.qkv.weight)] == 3.0
    assert mult[id(model.stage.inner.main.blocks[0].attn.qkv.weight)] == 0.5


@pytest.mark.parametrize("name", ["byte-hgrn", "hnet-hgrn"])
def test_byte_models_train_generate_and_round_trip(name, tmp_path):
    text = ["the red cat sat on the blue mat. the big dog ran to the old owl. " * 8] * 6
    dp = psannLMDataPrep(text, tokenizer="byte", max_length=64, val_split=0.2, seed=0)
    lm = psannLM(**SMALL[name])
    lm.fit(dp, max_steps=30, batch_tokens=256, lr=5e-3, amp="fp32", progress=False, plot=False, log_interval_steps=10,
           eval_interval_steps=0, device="cpu", checkpoint_dir=str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"] and train[0]["loss"] < math.log(256) + 0.5
    if name.startswith("hnet"):  # the ratio loss and compression of every stage are logged
        assert all("stage0_compression" in r and "stage0_ratio_loss" in r for r in train)
    single = lm.generate("the red", max_new_tokens=12, temperature=0)
    assert lm.generate_batch(["the red", "a"], max_new_tokens=12, temperature=0)[0] == single
    lm.save(tmp_path / "saved")
    assert psannLM.load(tmp_path / "saved").generate("the red", max_new_tokens=12, temperature=0) == single


def test_utf8_validity_counts_broken_bytes_but_not_a_cut_last_character():
    from psann.lm.eval.evaluate import utf8_validity

    cut = "héllo €".encode()[:-1]  # the euro sign loses its last byte to the length limit
    assert utf8_validity([b"plain", cut, b"bad \xff byte", b"\xc3(".rstrip()]) == 0.5


def test_seed_config_trains_from_the_command_line_and_eval_compares_checkpoints(tmp_path, capsys):
    from psann.cli import main as psannlm
    from psann.lm.train.cli import main as train

    text = tmp_path / "stories.txt"
    text.write_text("<|endoftext|>".join(f"the cat number {i} sat on the mat and looked at the dog." for i in range(80)),
                    encoding="utf-8")
    seed = {"model_type": "hnet_bit", "vocab_size": 256, "d_model": [32, 48], "num_blocks": [[1, 0, 1], [1]],
            "num_heads": 2, "max_position_embeddings": 64}
    (tmp_path / "tiny.json").write_text(json.dumps(seed))
    runs = {}
    for name, config in (("hnet", ["--config", str(tmp_path / "tiny.json")]),
                         ("flat", ["--model.base=byte", "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2"])):
        runs[name] = tmp_path / name
        assert train([*config, f"--data.train_files=[{text}]", "--data.doc_separator=<|endoftext|>",
                      "--data.max_length=64", "--train.max_steps=3", "--train.batch_tokens=256",
                      f"--train.checkpoint_dir={runs[name]}", "--train.progress=false", "--train.plot=false",
                      "--train.device=cpu", "--train.amp=fp32"]) == 0
        assert '"kind": "byte"' in (runs[name] / "checkpoints/final/tokenizer/psann_tokenizer.json").read_text()
    capsys.readouterr()
    ckpts = [str(runs[n] / "checkpoints/final") for n in ("hnet", "flat")]
    assert psannlm(["eval", "--ckpt", ckpts[0], "--ckpt", ckpts[1], "--data", str(text), "--samples", "2",
                    "--sample-bytes", "16"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["checkpoint", "base", "objective", "parameters"] and "BPB" in table[0]
    assert table[2].startswith(ckpts[0]) and " hnet " in table[2] and table[3].startswith(ckpts[1])
    assert psannlm(["eval", "--ckpt", ckpts[0], "--ckpt", ckpts[1], "--data", str(text), "--samples", "2",
                    "--sample-bytes", "16", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for r in results:  # byte models: one target per byte, plus each document's BOS and EOS but the first BOS
        assert r["tokens"] == r["bytes"] + 2 * 80 - 1
        assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / r["bytes"])
        assert r["byte_ppl"] == pytest.approx(2 ** r["bits_per_byte"]) and 0 <= r["utf8_valid"] <= 1
