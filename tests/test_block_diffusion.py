"""Block diffusion (model.diffusion_block): the layout's attention pattern, the bound, the sampler
reading a block as training does, and training, resuming and generating through the facade."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.config import ModelConfig
from psann.lm.errors import ConfigError
from psann.lm.models import build_model, check_model_config
from psann.lm.objectives import objective_for
from psann.lm.objectives.block_diffusion import block_diffusion_batch, block_diffusion_generate, segment_logits
from psann.lm.objectives.block_layout import ANCHOR, CLEAN, NOISED, block_layout, block_targets, laid_out
from psann.lm.objectives.diffusion import DiffusionSampleStats, diffusion_loss_sum, evaluate_nelbo
from test_diffusion import FAST, TEXT


def tiny_block_denoiser(vocab: int = 10, length: int = 24, block: int = 4, seed: int = 0, init_std: float = 0.02) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, vocab_size=vocab, max_seq_len=length, objective="diffusion",
                      mask_token_id=vocab - 1, diffusion_block=block, init_std=init_std)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def dp():
    return psannLMDataPrep(TEXT, tokenizer="char", max_length=32, val_split=0.1, seed=0)


def layout_logits(model: nn.Module, x: torch.Tensor, masked: torch.Tensor, block: int) -> torch.Tensor:
    layout = block_layout(x.shape[1], block)
    inputs = laid_out(x, masked, layout, model.config.mask_token_id)
    return model(inputs.ids, **inputs.kwargs)


# -- the layout ----------------------------------------------------------------------------------------
def test_layout_reads_each_block_after_the_clean_tokens_before_it():
    L, B = 10, 4  # blocks [0, 4), [4, 8), [8, 10)
    layout = block_layout(L, B)
    kinds = layout.kind.tolist()
    assert kinds == [CLEAN] * 8 + [ANCHOR] + [NOISED] * 4 + [ANCHOR] + [NOISED] * 4 + [ANCHOR] + [NOISED] * 2
    assert layout.source.tolist() == [*range(8), 0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 8, 9]
    # every token is predicted exactly once: by the anchor (the first of a block) or by the token before it
    predicted = [p for p in layout.predicts.tolist() if p >= 0]
    assert sorted(predicted) == list(range(L))
    vis = layout.visible
    clean = torch.arange(8)
    assert torch.equal(vis[:8, :8], torch.ones(8, 8, dtype=torch.bool).tril())  # the clean stream is causal
    assert not vis[:8, 8:].any()  # and sees no segment
    segments = [range(8, 13), range(13, 18), range(18, 21)]
    for b, seg in enumerate(segments):
        for q in seg:
            assert vis[q, clean].tolist() == [k < 4 * b for k in clean.tolist()]  # the clean blocks before it
            assert vis[q, list(seg)].all()  # its own segment, both ways
            others = [k for s in segments if s is not seg for k in s]
            assert not vis[q, others].any()
    assert layout.first_anchor.nonzero().flatten().tolist() == [8]


def test_a_blocks_predictions_depend_on_the_blocks_before_it_only():
    model = tiny_block_denoiser(init_std=0.3)
    torch.manual_seed(1)
    x = torch.randint(0, 9, (2, 24))
    masked = torch.rand(x.shape) < 0.5
    layout = block_layout(24, 4)
    base = layout_logits(model, x, masked, 4)
    # block 2, [8, 12)
    later = x.clone()
    later[:, 12:] = torch.randint(0, 9, (2, 12))
    remasked = masked.clone()
    remasked[:, 12:] = ~remasked[:, 12:]
    remasked[:, :8] = ~remasked[:, :8]  # the earlier blocks' noise: they are read clean
    rows = (layout.predicts >= 8) & (layout.predicts < 12)
    assert torch.allclose(layout_logits(model, later, remasked, 4)[:, rows], base[:, rows], atol=1e-5)
    hidden = x.clone()  # the block's own masked tokens are hidden from it
    own = torch.zeros_like(masked)
    own[:, 8:12] = masked[:, 8:12]
    hidden[own] = (hidden[own] + 1) % 9
    assert own.any() and torch.allclose(layout_logits(model, hidden, masked, 4)[:, rows], base[:, rows], atol=1e-5)
    earlier = x.clone()
    earlier[:, 5] = (earlier[:, 5] + 1) % 9
    assert not torch.allclose(layout_logits(model, earlier, masked, 4)[:, rows], base[:, rows], atol=1e-4)


def test_the_sampler_reads_a_block_as_training_does():
    model = tiny_block_denoiser(init_std=0.3)
    torch.manual_seed(2)
    x = torch.randint(0, 9, (2, 24))
    masked = torch.rand(x.shape) < 0.5
    layout = block_layout(24, 4)
    train = layout_logits(model, x, masked, 4)
    for b in (1, 3):  # the block [4b, 4b + 4) after the clean tokens x[:4b]
        segment = torch.where(masked[:, 4 * b:4 * b + 4], 9, x[:, 4 * b:4 * b + 4])
        sampled = segment_logits(model, x[:, :4 * b], torch.ones(2, 4 * b, dtype=torch.bool), segment)
        rows = (layout.predicts >= 4 * b) & (layout.predicts < 4 * b + 4)
        assert torch.allclose(sampled, train[:, rows], atol=1e-5)


# -- the bound ---------------------------------------------------------------------------------------------
def exact_block_nelbo(model: nn.Module, x: list[int], block: int, mask_id: int) -> float:
    """Sum over blocks of the exact MDLM NELBO of the block given the clean ones before it, by
    enumerating its mask sets: sum over S of (|S|-1)! (n-|S|)! / n! * sum_{i in S} CE_i."""
    L, ids = len(x), torch.tensor([x])
    layout = block_layout(L, block)
    total = 0.0
    for start in range(0, L, block):
        members = list(range(start, min(L, start + block)))
        n = len(members)
        for m in range(1, n + 1):
            for S in itertools.combinations(members, m):
                masked = torch.zeros(1, L, dtype=torch.bool)
                masked[0, list(S)] = True
                with torch.no_grad():
                    logits = layout_logits(model, ids, masked, block)[0].double()
                targets, _ = block_targets(ids, masked, layout)
                ce = F.cross_entropy(logits, targets[0], ignore_index=-100, reduction="sum")
                total += math.factorial(m - 1) * math.factorial(n - m) / math.factorial(n) * float(ce)
    return total


def test_the_block_nelbo_estimate_is_unbiased():
    model = tiny_block_denoiser(vocab=5, length=6, block=3, seed=1, init_std=0.7)

    class OneWindow:  # the windows interface evaluate_nelbo reads
        masked = False

        def __len__(self):
            return 1

        def batch(self, idx):
            return torch.tensor([[0, 2, 1, 3, 1, 0]] * len(idx)), None

    exact = exact_block_nelbo(model, [0, 2, 1, 3, 1, 0], 3, 4)
    r = evaluate_nelbo(model, OneWindow(), 1, torch.device("cpu"), mask_id=4, draws=3000, seed=0, block=3)
    se = math.sqrt(r["variance"])
    assert r["tokens"] == 6 and abs(r["nelbo_sum"] - exact) < 4 * se and se < 0.05 * exact


def test_the_training_loss_estimates_the_same_bound():
    model = tiny_block_denoiser(vocab=5, length=6, block=3, seed=1, init_std=0.7)
    x = torch.tensor([[0, 2, 1, 3, 1, 0]] * 2000)
    batch = block_diffusion_batch(x, block=3, mask_id=4, eps=1e-3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(batch.inputs.ids, **batch.inputs.kwargs)
    estimate = float(diffusion_loss_sum(logits, batch)) / len(x)
    assert batch.n_tokens == x.numel()
    assert abs(estimate - exact_block_nelbo(model, [0, 2, 1, 3, 1, 0], 3, 4)) < 0.05 * estimate


# -- sampling -------------------------------------------------------------------------------------------
def test_sampler_fills_blocks_left_to_right_and_batch_rows_equal_single_prompts():
    model = tiny_block_denoiser(init_std=0.3)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 1, 2]]
    opts = dict(mask_id=9, block=4, gen_length=10, steps=10, temperature=0.0, pad_id=0)
    batch = block_diffusion_generate(model, prompts, **opts)
    assert [len(r) for r in batch] == [10, 10, 10] and all(9 not in r for r in batch)
    assert batch == [block_diffusion_generate(model, [p], **opts)[0] for p in prompts]
    sampled = block_diffusion_generate(model, prompts, **{**opts, "temperature": 1.0}, seed=3)
    assert sampled == block_diffusion_generate(model, prompts, **{**opts, "temperature": 1.0}, seed=3)
    # The first block, once committed, is context: a different second block cannot change it.
    short = block_diffusion_generate(model, prompts, **{**opts, "gen_length": 4, "steps": 4})
    assert [r[:4] for r in batch] == short
    # Rows end as blocks finish: a stop after 5 tokens leaves the third block unsampled.
    stats = DiffusionSampleStats()
    stopped = block_diffusion_generate(model, prompts, **opts, should_stop=lambda row, ids: len(ids) >= 5, stats=stats)
    assert stopped == [r[:5] for r in batch] and stats.forwards == 4 + 3  # the steps of 2 blocks of 3 (4, 3, 3)


# -- configs and the facade -------------------------------------------------------------------------------
def test_block_diffusion_options_are_checked():
    with pytest.raises(ConfigError, match="shift_logits"):
        ModelConfig(objective="diffusion", diffusion_block=4, shift_logits=True)
    with pytest.raises(ConfigError, match="only applies to objective 'diffusion'"):
        ModelConfig(diffusion_block=4)
    with pytest.raises(ConfigError, match="waveresnet's convolutions"):
        check_model_config(ModelConfig(base="waveresnet", objective="diffusion", diffusion_block=4))
    assert type(objective_for(ModelConfig(objective="diffusion", diffusion_block=4))).__name__ == "BlockDiffusion"


def test_block_diffusion_trains_resumes_and_generates(dp, tmp_path):
    from safetensors.torch import load_file

    opts = dict(FAST, max_steps=6, batch_tokens=128, eval_interval_steps=0)
    a = psannLM(d_model=32, n_layers=1, n_heads=4, objective="diffusion", diffusion_block=8)
    a.fit(dp, checkpoint_dir=str(tmp_path / "a"), save_interval_steps=3, **opts)
    psannLM(d_model=32, n_layers=1, n_heads=4, objective="diffusion", diffusion_block=8).fit(
        dp, checkpoint_dir=str(tmp_path / "b"), resume_from=str(tmp_path / "a/checkpoints/step_0000003"), **opts)
    wa = load_file(tmp_path / "a/checkpoints/final/model.safetensors")
    wb = load_file(tmp_path / "b/checkpoints/final/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert a.last_run["val_loss"] > 0
    text = a.generate("the red", max_new_tokens=12, temperature=0, steps=12)
    assert text == a.generate_batch(["the red", "a"], max_new_tokens=12, temperature=0, steps=12)[0]
    loaded = psannLM.load(tmp_path / "a/checkpoints/final")
    assert loaded.model_config.diffusion_block == 8
    assert loaded.generate("the red", max_new_tokens=12, temperature=0, steps=12) == text
    with pytest.raises(ConfigError, match="blocks of 8 tokens"):
        a.generate("the red", max_new_tokens=12, block_length=4)
    with pytest.raises(ConfigError, match="attention_anneal_steps"):
        psannLM(d_model=32, n_layers=1, n_heads=4, objective="diffusion", diffusion_block=8).fit(
            dp, checkpoint_dir=str(tmp_path / "c"), attention_anneal_steps=2, **opts)


def test_a_causal_checkpoint_starts_a_block_diffusion_model_where_it_left_off(dp, tmp_path):
    torch.manual_seed(0)
    opts = dict(FAST, batch_tokens=256, eval_interval_steps=0)
    psannLM(d_model=32, n_layers=2, n_heads=4).fit(dp, max_steps=40, checkpoint_dir=str(tmp_path / "causal"), **opts)
    start = str(tmp_path / "causal/checkpoints/final")
    first = {}
    for name, init in (("causal", start), ("scratch", None)):
        lm = psannLM(d_model=32, n_layers=2, n_heads=4, objective="diffusion", diffusion_block=4)
        lm.fit(dp, init_from=init, checkpoint_dir=str(tmp_path / name), max_steps=1, **{**opts, "lr": 1e-12})
        first[name] = lm.last_run["val_loss"]
    assert first["causal"] < 0.8 * first["scratch"]  # the anchor reads each block as the causal head did
