
import pytest
import torch

from psann.lm.config import GenerateConfig
from psann.lm.objectives.causal import generate_tokens
from psann.lm.objectives.causal import apply_repetition_penalty, choose_next, top_k_filter, top_p_filter
from psann.lm.models import build_model

from conftest import tiny_config

PAD, EOS = 0, 1


def test_top_p_keeps_the_crossing_token():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 crosses: both stay
    kept = torch.isfinite(top_p_filter(logits, 0.5))[0].tolist()
    assert kept == [True, False, False, False]  # 0.5 reaches 0.5 exactly
    kept = torch.isfinite(top_p_filter(logits, 0.81))[0].tolist()
    assert kept == [True, True, True, False]
    shuffled = logits[:, [2, 0, 3, 1]]  # order must not matter
    assert torch.isfinite(top_p_filter(shuffled, 0.7))[0].tolist() == [False, True, False, True]


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([[3.0, 0.0, -1.0]])
    assert torch.isfinite(top_p_filter(logits, 1e-6)).sum() == 1


def test_top_k():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2))[0].tolist() == [False, True, True, False]


def test_repetition_penalty_is_ctrl_form():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    present = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, present, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_sampling_seeded_and_greedy():
    logits = torch.randn(4, 50)
    a = choose_next(logits, temperature=1.0, top_k=None, top_p=1.0, generator=torch.Generator().manual_seed(3))
    b = choose_next(logits, temperature=1.0, top_k=None, top_p=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(choose_next(logits, temperature=0, top_k=None, top_p=1.0), logits.argmax(-1))


@pytest.fixture
def model():
    torch.manual_seed(1)
    return build_model(tiny_config(max_seq_len=48)).eval()


def _greedy(n):
    return GenerateConfig(max_new_tokens=n, temperature=0)


def test_batch_rows_equal_single_prompt_results(model):
    prompts = [[2, 5, 9], [2, 7, 7, 30, 11, 4, 8, 19], [2], [2, 40, 41, 42, 43]]
    batch = generate_tokens(model, prompts, _greedy(20), eos_id=None, pad_id=PAD, max_seq_len=48)
    for p, row in zip(prompts, batch):
        assert row == generate_tokens(model, [p], _greedy(20), eos_id=None, pad_id=PAD, max_seq_len=48)[0]


def test_batch_rows_equal_single_prompts_past_the_context_window():
    # rows of different lengths fill their windows at different steps; each slides as it would alone
    torch.manual_seed(1)
    model = build_model(tiny_config(max_seq_len=48, init_std=0.5)).eval()  # large weights: output follows context
    # (a window of 48 keeps 36: the 40-token row slides at step 9, when the 30-token row holds 39)
    prompts = [[2, *range(3, 42)], [2, *range(10, 39)], [2, 5, 9]]
    batch = generate_tokens(model, prompts, _greedy(60), eos_id=None, pad_id=PAD, max_seq_len=48)
    for p, row in zip(prompts, batch):
        assert row == generate_tokens(model, [p], _greedy(60), eos_id=None, pad_id=PAD, max_seq_len=48)[0]


def test_cache_and_recompute_agree(model):
    prompts = [[2, 5, 9, 13], [2, 3]]
    with_cache = generate_tokens(model, prompts, _greedy(25), eos_id=None, pad_id=PAD, max_seq_len=48)
    without = generate_tokens(model, prompts, _greedy(25), eos_id=None, pad_id=PAD, max_seq_len=48, use_cache=False)
    assert with_cache == without


def test_generation_past_the_context_window(model):
    long_prompt = [2] + list(range(3, 60)) * 2  # longer than max_seq_len
    out = generate_tokens(model, [long_prompt], _greedy(70), eos_id=None, pad_id=PAD, max_seq_len=48)
    assert len(out[0]) == 70


def test_stops_at_eos_and_on_request(model):
    greedy = generate_tokens(model, [[2, 5]], _greedy(10), eos_id=None, pad_id=PAD, max_seq_len=48)[0]
    eos = greedy[3]
    stopped = generate_tokens(model, [[2, 5]], _greedy(10), eos_id=eos, pad_id=PAD, max_seq_len=48)[0]
    assert stopped == greedy[:greedy.index(eos)]
    early = generate_tokens(model, [[2, 5]], _greedy(10), eos_id=None, pad_id=PAD, max_seq_len=48,
                            should_stop=lambda row, ids: len(ids) == 4)[0]
    assert early == greedy[:4]


def test_repetition_penalty_changes_greedy_output(model):
    plain = generate_tokens(model, [[2, 5]], _greedy(30), eos_id=None, pad_id=PAD, max_seq_len=48)[0]
    pen = generate_tokens(model, [[2, 5]], GenerateConfig(max_new_tokens=30, temperature=0, repetition_penalty=5.0),
                          eos_id=None, pad_id=PAD, max_seq_len=48)[0]
    assert len(set(pen)) >= len(set(plain))
    assert pen != plain or len(set(plain)) == len(plain)


def test_seeded_sampling_reproducible(model):
    cfg = GenerateConfig(max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7)
    a = generate_tokens(model, [[2, 5]], cfg, eos_id=None, pad_id=PAD, max_seq_len=48)
    b = generate_tokens(model, [[2, 5]], cfg, eos_id=None, pad_id=PAD, max_seq_len=48)
    assert a == b
