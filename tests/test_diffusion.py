"""Masked diffusion LMs: the noising and loss, the block sampler, the NELBO bound, training and configs."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.config import GenerateConfig, ModelConfig, load_config
from psann.lm.errors import ConfigError
from psann.lm.objectives.diffusion import evaluate_nelbo
from psann.lm.objectives.diffusion import DiffusionSampleStats, commit_plan, diffusion_generate
from psann.lm.models import build_model, check_model_config
from psann.lm.objectives.diffusion import diffusion_batch, diffusion_loss_sum, sample_noise_levels

MASK = 9


def tiny_denoiser(vocab: int = 10, length: int = 24, seed: int = 0, init_std: float = 0.02) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=vocab, max_seq_len=length, objective="diffusion",
                      mask_token_id=vocab - 1, init_std=init_std)
    return build_model(cfg).eval()


class Recorder(nn.Module):
    """Passes calls through and keeps every input the sampler showed the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x, **kwargs):
        self.seen.append(x.clone())
        return self.model(x, **kwargs)


# -- noising and the loss --------------------------------------------------------------------------
def test_masking_rate_matches_p_mask():
    x = torch.randint(0, 9, (64, 4000))
    batch = diffusion_batch(x, mask_id=MASK, eps=1e-3, t_sampling="uniform", generator=torch.Generator().manual_seed(0))
    rate = (batch.inputs == MASK).float().mean(1)
    p_mask = 1 / batch.weights
    assert torch.allclose(rate, p_mask, atol=0.03)
    assert torch.equal(batch.targets[batch.inputs == MASK], x[batch.inputs == MASK])
    assert bool((batch.targets[batch.inputs != MASK] == -100).all()) and batch.n_tokens == x.numel()


def test_loss_equals_a_hand_computation():
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    batch = diffusion_batch(x, mask_id=MASK, eps=0.5, generator=torch.Generator().manual_seed(3))
    logits = torch.randn(2, 3, 10)
    expected = 0.0
    for b in range(2):
        p = 1 / float(batch.weights[b])
        for i in range(3):
            if batch.inputs[b, i] == MASK:
                expected += -F.log_softmax(logits[b, i], -1)[x[b, i]].item() / p
    assert float(diffusion_loss_sum(logits, batch)) == pytest.approx(expected, rel=1e-5)
    assert (batch.inputs == MASK).any()  # the case is not trivially zero


def test_epsilon_keeps_the_weights_bounded(monkeypatch):
    import psann.lm.objectives.diffusion as objectives

    monkeypatch.setattr(objectives, "sample_noise_levels", lambda n, mode, generator=None: torch.zeros(n))
    batch = diffusion_batch(torch.ones(8, 16, dtype=torch.long), mask_id=MASK, eps=1e-3)
    assert torch.allclose(batch.weights, torch.full((8,), 1e3))


@pytest.mark.parametrize("mode", ["uniform", "stratified", "antithetic"])
def test_noise_levels_cover_the_unit_interval(mode):
    t = sample_noise_levels(1000, mode, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 1 and abs(float(t.mean()) - 0.5) < 0.03
    if mode == "stratified":  # one draw in each of the n strata
        assert torch.equal(torch.sort((t * 1000).floor()).values, torch.arange(1000.0))
    if mode == "antithetic":
        assert torch.allclose(t[:500] + t[500:], torch.ones(500))


def test_random_truncation_and_unmaskable_positions():
    x = torch.randint(0, 9, (4, 50))
    prompt = torch.zeros(4, 50, dtype=torch.bool)
    prompt[:, :20] = True
    batch = diffusion_batch(x, mask_id=MASK, eps=1.0, maskable=~prompt)  # eps 1: mask everything maskable
    assert not (batch.inputs[:, :20] == MASK).any() and (batch.inputs[:, 20:] == MASK).all()
    assert batch.n_tokens == 4 * 30
    lengths = {diffusion_batch(x, mask_id=MASK, eps=0.5, trunc_prob=1.0, generator=torch.Generator().manual_seed(s))
               .inputs.shape[1] for s in range(20)}
    assert len(lengths) > 5 and max(lengths) <= 50 and min(lengths) >= 1


# -- the sampler ----------------------------------------------------------------------------------
def test_commit_plan_splits_evenly_with_the_remainder_first():
    assert commit_plan(10, 4) == [3, 3, 2, 2]
    assert commit_plan(3, 5) == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("temperature, remasking", [(0.0, "low_confidence"), (1.0, "low_confidence"), (0.7, "random")])
def test_sampler_commits_the_plan_block_by_block_and_never_touches_the_prompt(temperature, remasking):
    model = Recorder(tiny_denoiser())
    prompts = [[1, 2, 3, 4], [5, 6]]
    out = diffusion_generate(model, prompts, mask_id=MASK, gen_length=12, block_length=4, steps=6,
                             temperature=temperature, remasking=remasking, pad_id=0, seed=0, reuse_logits=False)
    assert all(len(o) == 12 and MASK not in o for o in out)  # every mask is filled
    seen = model.seen
    assert len(seen) == 6
    width = 4
    plan = [2, 2, 2, 2, 2, 2]  # 3 blocks x 2 steps, 4 tokens per block
    final = torch.tensor([[1, 2, 3, 4] + out[0], [0, 0, 5, 6] + out[1]])
    states = seen + [final]
    for step in range(6):
        before, after = states[step], states[step + 1]
        assert torch.equal(before[:, :width], after[:, :width])  # the prompt and its padding stay
        changed = before != after
        assert (changed.sum(1) == plan[step]).all()  # exactly the planned count, in every row
        block = step // 2
        lo, hi = width + 4 * block, width + 4 * (block + 1)
        assert not changed[:, :lo].any() and not changed[:, hi:].any()  # only the current block
        assert (before[changed] == MASK).all()  # only masked positions are committed
        if step % 2 == 1:  # a block is complete before the next one starts
            assert not (after[:, lo:hi] == MASK).any() and (after[:, hi:] == MASK).all()


def test_temperature_zero_is_deterministic_and_seeds_reproduce_samples():
    model = tiny_denoiser()
    kwargs = dict(mask_id=MASK, gen_length=8, block_length=4, steps=8, pad_id=0)
    greedy = [diffusion_generate(model, [[1, 2]], temperature=0.0, seed=s, **kwargs) for s in (0, 1)]
    assert greedy[0] == greedy[1]
    a, b = (diffusion_generate(model, [[1, 2]], temperature=1.0, seed=7, **kwargs) for _ in range(2))
    assert a == b
    draws = {tuple(diffusion_generate(model, [[1, 2]], temperature=2.0, seed=s, **kwargs)[0]) for s in range(8)}
    assert len(draws) > 1


def test_cfg_scale_zero_equals_no_guidance_and_a_scale_changes_the_logits():
    model = tiny_denoiser()
    kwargs = dict(mask_id=MASK, gen_length=8, block_length=8, steps=8, pad_id=0, temperature=0.0)
    plain = diffusion_generate(model, [[1, 2, 3]], **kwargs)
    assert diffusion_generate(model, [[1, 2, 3]], cfg_scale=0.0, **kwargs) == plain
    stats = DiffusionSampleStats()
    diffusion_generate(model, [[1, 2, 3]], cfg_scale=3.0, stats=stats, **kwargs)
    assert stats.forwards == 2 * 8  # a conditional and an unconditional pass per step


def test_suppressed_ids_and_the_mask_are_never_sampled():
    model = tiny_denoiser()
    out = diffusion_generate(model, [[1, 2]], mask_id=MASK, gen_length=16, steps=16, temperature=5.0,
                             suppress_ids=[0, 1, 2, 3], pad_id=0, seed=0)[0]
    assert not {0, 1, 2, 3, MASK} & set(out)


def test_steps_that_commit_nothing_reuse_the_logits():
    model = Recorder(tiny_denoiser())
    stats = DiffusionSampleStats()
    out = diffusion_generate(model, [[1, 2]], mask_id=MASK, gen_length=4, steps=8, temperature=0.0, pad_id=0,
                             stats=stats)
    assert stats.steps == 8 and stats.forwards == 4 and stats.reused == 4  # plan [1,1,1,1,0,0,0,0]
    model.seen.clear()
    assert diffusion_generate(model, [[1, 2]], mask_id=MASK, gen_length=4, steps=8, temperature=0.0, pad_id=0,
                              reuse_logits=False) == out and len(model.seen) == 8


def test_batch_rows_equal_single_prompts():
    model = tiny_denoiser()
    kwargs = dict(mask_id=MASK, gen_length=8, block_length=4, steps=8, pad_id=0, temperature=0.0)
    batched = diffusion_generate(model, [[1, 2, 3, 4, 5], [6]], **kwargs)
    assert batched == [diffusion_generate(model, [[1, 2, 3, 4, 5]], **kwargs)[0],
                       diffusion_generate(model, [[6]], **kwargs)[0]]


def test_bad_sampler_settings_are_errors():
    model = tiny_denoiser()
    with pytest.raises(ConfigError, match="multiple of block_length"):
        diffusion_generate(model, [[1]], mask_id=MASK, gen_length=10, block_length=4)
    with pytest.raises(ConfigError, match="at least the number of blocks"):
        diffusion_generate(model, [[1]], mask_id=MASK, gen_length=8, block_length=2, steps=3)


# -- the likelihood bound -----------------------------------------------------------------------------
def exact_nll_and_nelbo(model: nn.Module, x: list[int], mask_id: int) -> tuple[float, float]:
    """For a sequence x of length L, by enumeration: the model's NLL under its own one-token-at-a-
    time sampling process (uniform random order), and its exact NELBO
    sum over mask sets S of (|S|-1)! (L-|S|)! / L! * sum_{i in S} CE_i(x with S masked)."""
    L = len(x)

    @torch.no_grad()
    def log_probs(masked: frozenset) -> torch.Tensor:
        ids = torch.tensor([[mask_id if i in masked else t for i, t in enumerate(x)]])
        return F.log_softmax(model(ids)[0].double(), -1)

    nelbo = 0.0
    for m in range(1, L + 1):
        for S in itertools.combinations(range(L), m):
            lp = log_probs(frozenset(S))
            weight = math.factorial(m - 1) * math.factorial(L - m) / math.factorial(L)
            nelbo += weight * float(sum(-lp[i, x[i]] for i in S))
    orders = list(itertools.permutations(range(L)))
    likelihood = 0.0
    for order in orders:
        masked, logp = set(range(L)), 0.0
        for i in order:
            logp += float(log_probs(frozenset(masked))[i, x[i]])
            masked.discard(i)
        likelihood += math.exp(logp) / len(orders)
    return -math.log(likelihood), nelbo


def test_nelbo_bounds_the_true_nll_on_a_toy_model_and_the_estimate_is_unbiased():
    vocab, L = 4, 3  # tokens 0..2, mask 3
    model = tiny_denoiser(vocab=vocab, length=L, seed=1, init_std=0.7)  # large weights: strongly context-dependent
    total, gaps = 0.0, []
    for x in itertools.product(range(vocab - 1), repeat=L):
        nll, nelbo = exact_nll_and_nelbo(model, list(x), vocab - 1)
        total += math.exp(-nll)
        gaps.append(nelbo - nll)
    assert total <= 1.0 + 1e-6  # a proper distribution over the non-mask sequences (mass may go to masks: none here)
    assert min(gaps) >= -1e-9 and max(gaps) > 1e-3  # NELBO >= NLL for every sequence, strictly for some

    class OneWindow:  # the windows interface evaluate_nelbo reads
        masked = False  # not SFT data: every position may be masked

        def __len__(self):
            return 1

        def batch(self, idx):
            return torch.tensor([[0, 2, 1]] * len(idx)), None

    exact = exact_nll_and_nelbo(model, [0, 2, 1], vocab - 1)[1]
    r = evaluate_nelbo(model, OneWindow(), 1, torch.device("cpu"), mask_id=vocab - 1, draws=4000, seed=0)
    se = math.sqrt(r["variance"])
    assert r["tokens"] == 3 and abs(r["nelbo_sum"] - exact) < 4 * se and se < 0.05 * exact


# -- training, generation through the facade, configs -----------------------------------------------------
TEXT = [f"the {a} {b} sat on the {c} mat number {i}." for i, (a, b, c) in
        enumerate([("red", "cat", "blue"), ("big", "dog", "green"), ("old", "owl", "soft")] * 30)]
FAST = dict(amp="fp32", progress=False, plot=False, log_interval_steps=5, device="cpu", lr=3e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def dp():
    return psannLMDataPrep(TEXT, tokenizer="char", max_length=32, val_split=0.1, seed=0)


@pytest.mark.parametrize("base", ["transformer", "respsann", "waveresnet"])
def test_diffusion_trains_generates_and_round_trips(dp, tmp_path, base):
    lm = psannLM(base=base, d_model=32, n_layers=2, n_heads=4, objective="diffusion")
    lm.fit(dp, max_steps=30, batch_tokens=256, eval_interval_steps=15, checkpoint_dir=str(tmp_path / "run"), **FAST)
    cfg = lm.model_config
    assert cfg.mask_token_id == dp.vocab_size and cfg.vocab_size == dp.vocab_size + 1 and cfg.causal is False
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert train[-1]["loss"] < train[0]["loss"] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert all(r["val_nelbo_se"] > 0 for r in val)
    text = lm.generate("the red", max_new_tokens=8, temperature=0, block_length=4, steps=8)
    assert text == lm.generate_batch(["the red", "a"], max_new_tokens=8, temperature=0, block_length=4, steps=8)[0]
    lm.save(tmp_path / "saved")
    loaded = psannLM.load(tmp_path / "saved")
    assert loaded.model_config.mask_token_id == cfg.mask_token_id
    assert loaded.generate("the red", max_new_tokens=8, temperature=0, block_length=4, steps=8) == text


@pytest.mark.parametrize("anneal", [0, 4])  # the anneal's masks come from the checkpointed RNG too
def test_diffusion_resume_is_exact(dp, tmp_path, anneal):
    opts = dict(FAST, max_steps=6, batch_tokens=128, eval_interval_steps=0, attention_anneal_steps=anneal)
    psannLM(d_model=32, n_layers=1, n_heads=4, objective="diffusion").fit(
        dp, checkpoint_dir=str(tmp_path / "a"), save_interval_steps=3, **opts)
    psannLM(d_model=32, n_layers=1, n_heads=4, objective="diffusion").fit(
        dp, checkpoint_dir=str(tmp_path / "b"), resume_from=str(tmp_path / "a/checkpoints/step_0000003"), **opts)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a/checkpoints/final/model.safetensors"), load_file(tmp_path / "b/checkpoints/final/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sampler_options_belong_to_their_objective(dp, tmp_path):
    lm = psannLM(d_model=32, n_layers=1, n_heads=4, objective="diffusion")
    lm.fit(dp, max_steps=1, batch_tokens=64, eval_interval_steps=0, checkpoint_dir=str(tmp_path / "d"), **FAST)
    with pytest.raises(ConfigError, match="generate.top_k"):
        lm.generate("the", max_new_tokens=4, top_k=5)
    causal = psannLM(d_model=32, n_layers=1, n_heads=4)
    causal.fit(dp, max_steps=1, batch_tokens=64, eval_interval_steps=0, checkpoint_dir=str(tmp_path / "c"), **FAST)
    with pytest.raises(ConfigError, match="generate.block_length"):
        causal.generate("the", max_new_tokens=4, block_length=2)
    with pytest.raises(ConfigError, match="only applies to objective 'diffusion'"):
        ModelConfig(noise_epsilon=0.1)
    with pytest.raises(ConfigError, match="H-Net"):
        check_model_config(ModelConfig(base="hnet", d_model=[16, 32], num_blocks=[[1, 0, 1], [1]], objective="diffusion"))
    GenerateConfig(steps=4).check_objective("diffusion")


def test_toml_configs_work_like_yaml_and_every_command_prints_its_config(tmp_path, capsys):
    from psann.cli import main as psannlm

    toml = tmp_path / "diffusion.toml"
    toml.write_text('[model]\nobjective = "diffusion"\nd_model = 64\nn_layers = 2\nnoise_epsilon = 0.001\n'
                    'random_trunc_prob = 0.01\n[train]\nlr = 5e-4\n[generate]\nsteps = 32\nblock_length = 8\n')
    yaml_file = tmp_path / "diffusion.yaml"
    yaml_file.write_text("model:\n  objective: diffusion\n  d_model: 64\n  n_layers: 2\n  noise_epsilon: 0.001\n"
                         "  random_trunc_prob: 0.01\ntrain:\n  lr: 5.0e-4\ngenerate:\n  steps: 32\n  block_length: 8\n")
    assert load_config(toml) == load_config(yaml_file)
    assert psannlm(["train", "--config", str(toml), "--print-config"]) == 0
    assert "objective: diffusion" in capsys.readouterr().out
    for argv in (["eval", "--ckpt", "x", "--data", "y"], ["tokenizer", "stats", "--tokenizer", "t", "--input", "i"],
                 ["data", "info", "somewhere"], ["demo"]):
        assert psannlm([*argv, "--print-config"]) == 0, argv
        assert capsys.readouterr().out.strip(), argv


def test_sft_windows_score_responses_and_diffusion_never_masks_the_prompt(tmp_path):
    from psann.lm.data.sft import response_positions

    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"it is {2 * i}."} for i in range(40)]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    causal = psannLMDataPrep.from_sft([path], tokenizer="char", max_length=40, val_split=0.1)
    diffusion = psannLMDataPrep.from_sft([path], tokenizer="char", max_length=40, val_split=0.1, objective="diffusion")
    tok = causal.tokenizer
    x, y = causal.train_windows.batch([0])
    scored = tok.decode([t for t in y[0].tolist() if t >= 0])
    assert scored.startswith("it is ") and "?" not in scored  # the response and its EOS only
    assert (x[0] == tok.pad_id).any() and (y[0][x[0] == tok.pad_id] == -100).all()
    x, y = diffusion.train_windows.batch(list(range(8)))
    eos = diffusion.tokenizer.eos_id
    assert (x[:, -1] == eos).all() and (y[:, -1] == eos).all()  # padded with EOS, which count as answer tokens
    answer = response_positions(y)
    noised = diffusion_batch(x, mask_id=99, eps=1.0, maskable=answer)  # eps 1: mask every maskable position
    assert torch.equal(noised.inputs[~answer], x[~answer]) and (noised.inputs[answer] == 99).all()
    assert noised.n_tokens == int(answer.sum())
    for row in range(8):  # what stays visible is exactly BOS + the prompt
        visible = tok.decode(noised.inputs[row][~answer[row]].tolist())
        assert visible.endswith("?") and visible.startswith(tok.special_tokens()[tok.bos_id] + "what is ")


def test_diffusion_sft_trains_from_a_config(tmp_path):
    from psann.lm.train.cli import main as train

    rows = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in ["red", "blue", "green", "cat", "dog"] * 8]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert train(["--model.objective=diffusion", "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=4",
                  f"--data.sft_files=[{path}]", "--data.tokenizer=char", "--data.max_length=24", "--train.max_steps=4",
                  "--train.batch_tokens=96", f"--train.checkpoint_dir={tmp_path / 'run'}", "--train.progress=false",
                  "--train.plot=false", "--train.device=cpu", "--train.amp=fp32"]) == 0
    lm = psannLM.load(tmp_path / "run/checkpoints/final")
    assert lm.model_config.objective == "diffusion" and isinstance(lm.generate("say red", max_new_tokens=6), str)
    with pytest.raises(ConfigError, match="sft_files"):
        load_config(None, [f"--data.sft_files=[{path}]", "--data.train_files=[x.txt]"])


def test_a_causal_checkpoint_starts_a_diffusion_model_with_shifted_logits(dp, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    opts = dict(FAST, batch_tokens=256, eval_interval_steps=0)
    psannLM(d_model=32, n_layers=2, n_heads=4).fit(dp, max_steps=40, checkpoint_dir=str(tmp_path / "causal"), **opts)
    start = str(tmp_path / "causal/checkpoints/final")
    causal = load_file(f"{start}/model.safetensors")
    first = {}
    for shift in (True, False):
        lm = psannLM(d_model=32, n_layers=2, n_heads=4, objective="diffusion", shift_logits=shift)
        lm.fit(dp, init_from=start, checkpoint_dir=str(tmp_path / f"shift{shift}"), max_steps=1, **{**opts, "lr": 1e-12})
        first[shift] = lm.last_run["val_loss"]
    embed = lm.model.embed.weight.detach()
    assert embed.shape[0] == dp.vocab_size + 1 and torch.allclose(embed[:-1], causal["embed.weight"])
    assert torch.allclose(embed[-1], causal["embed.weight"].mean(0))  # the mask token: the mean embedding
    scratch = psannLM(d_model=32, n_layers=2, n_heads=4, objective="diffusion", shift_logits=True)
    scratch.fit(dp, checkpoint_dir=str(tmp_path / "scratch"), max_steps=1, **{**opts, "lr": 1e-12})
    # The causal head's next-token predictions carry over only when position i reads i - 1.
    assert first[True] < 0.9 * scratch.last_run["val_loss"] and first[True] < first[False]
    with pytest.raises(ConfigError, match="shift_logits.*only applies to objective 'diffusion'"):
        ModelConfig(shift_logits=True)


def test_shifted_logits_read_each_position_from_the_one_before_it():
    plain = tiny_denoiser(length=12)
    shifted = build_model(ModelConfig(**{**plain.config.__dict__, "shift_logits": True})).eval()
    shifted.load_state_dict(plain.state_dict())
    x = torch.randint(0, 9, (3, 12))
    ours, theirs = shifted(x), plain(x)
    assert torch.allclose(ours[:, 1:], theirs[:, :-1], atol=1e-6) and torch.allclose(ours[:, 0], theirs[:, 0], atol=1e-6)
    assert torch.allclose(shifted(x, last_only=True)[:, -1], ours[:, -1], atol=1e-6)


def test_attention_anneal_opens_the_causal_pattern_and_changes_training(dp, tmp_path):
    from safetensors.torch import load_file

    from psann.lm.objectives.diffusion import annealed_visibility

    torch.manual_seed(0)
    assert torch.equal(annealed_visibility(16, 0.0), torch.ones(16, 16, dtype=torch.bool).tril())
    assert bool(annealed_visibility(16, 1.0).all())
    half = annealed_visibility(64, 0.5)
    assert 0.4 < float(half.triu(1).sum()) / (64 * 63 / 2) < 0.6
    # A denoiser shown the causal pattern is the same network as the causal model with its weights.
    denoiser = tiny_denoiser(length=12)
    causal = build_model(ModelConfig(**{**denoiser.config.__dict__, "objective": "causal", "causal": True, "mask_token_id": None}))
    causal.load_state_dict(denoiser.state_dict())
    x = torch.randint(0, 9, (3, 12))
    tril = annealed_visibility(12, 0.0)
    assert torch.allclose(denoiser(x, visible=tril), causal.eval()(x), atol=1e-5)
    assert not torch.allclose(denoiser(x, visible=tril), denoiser(x), atol=1e-3)
    # Padding stays hidden under the pattern: left-padded rows match the unpadded ones.
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    padded = denoiser(x[:1], attention_mask=pad, visible=tril)[:, 2:]
    assert torch.allclose(padded, denoiser(x[:1, 2:], visible=annealed_visibility(10, 0.0)), atol=1e-5)

    opts = dict(FAST, max_steps=6, batch_tokens=128, eval_interval_steps=0, attention_anneal_steps=4)
    finals = []
    for name, anneal in (("a", 4), ("c", 0)):
        torch.manual_seed(0)
        psannLM(d_model=32, n_layers=1, n_heads=4, objective="diffusion").fit(
            dp, checkpoint_dir=str(tmp_path / name), **dict(opts, attention_anneal_steps=anneal))
        finals.append(load_file(tmp_path / f"{name}/checkpoints/final/model.safetensors"))
    a, c = finals
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)  # the anneal changed the updates
    with pytest.raises(ConfigError, match="attention_anneal_steps.*never trains with the bidirectional"):
        psannLM(d_model=32, n_layers=1, n_heads=4, objective="diffusion").fit(
            dp, checkpoint_dir=str(tmp_path / "e"), **dict(opts, attention_anneal_steps=6))
    with pytest.raises(ConfigError, match="attention_anneal_steps.*this model is causal"):
        psannLM(d_model=32, n_layers=1, n_heads=4).fit(dp, checkpoint_dir=str(tmp_path / "d"), **opts)
