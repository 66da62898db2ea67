"""Log-likelihood scoring (loglik.py) and `psannlm eval mc`: exact sums, batching, windows, the diffusion bound."""

import json
import logging
import math
import random

import pytest
import torch

from psann.cli import main as cli
from psann.lm.config import ModelConfig, RunConfig
from psann.lm.eval.loglik import MonteCarlo, Scorer, continuation_windows, encode_pair, rolling_windows, score_windows
from psann.lm.eval.mc import score_rows
from psann.lm.models import build_model
from psann.lm.tokenizers import build_tokenizer
from psann.lm.train.checkpoint import save_checkpoint

TEXTS = [f"little {w} went to the market and bought {n} apples." for n in range(30) for w in ("tom", "ann")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and on a busy shared CPU they lose a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_checkpoint(directory, tokenizer: str = "bpe", seed: int = 0, **model) -> str:
    """An untrained tiny checkpoint (scoring is exact whatever the weights are)."""
    tok = build_tokenizer(tokenizer, TEXTS, vocab_size=300 if tokenizer == "bpe" else None)
    values = dict(d_model=32, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=48)
    values.update(model)
    if values.get("objective") == "diffusion":
        values.update(mask_token_id=tok.vocab_size, vocab_size=tok.vocab_size + 1)
    config = ModelConfig(**values)
    torch.manual_seed(seed)
    save_checkpoint(directory, build_model(config), tok, RunConfig(model=config))
    return str(directory)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "c")


@pytest.fixture(scope="module")
def scorer(ckpt):
    return Scorer.load(ckpt)


def direct_logprob(model, tokens: list[int], n: int) -> float:
    """Sum of log-softmax over the last n tokens of one unbatched full forward."""
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens[:-1]])).float().log_softmax(-1)[0]
    return float(sum(logprobs[i - 1, tokens[i]] for i in range(len(tokens) - n, len(tokens))))


def random_windows(vocab: int, count: int = 9, seed: int = 0):
    rng = random.Random(seed)
    pairs = [([rng.randrange(4, vocab) for _ in range(rng.randint(1, 12))],
              [rng.randrange(4, vocab) for _ in range(rng.randint(1, 6))]) for _ in range(count)]
    return continuation_windows(pairs, span=40)


SMALL = dict(d_model=32, n_layers=2, n_heads=4, vocab_size=61)
FAMILIES = {
    "transformer": SMALL,
    "respsann": dict(SMALL, base="respsann"),
    "waveresnet": dict(SMALL, base="waveresnet"),
    "byte": dict(SMALL, base="byte", vocab_size=256, n_heads=2),
    "byte-hgrn": dict(SMALL, base="byte", vocab_size=256, n_heads=2, layer_type="hgrn_bit"),
    "hnet": dict(base="hnet", vocab_size=256, d_model=[32, 48], num_blocks=[[1, 0, 1], [2]], n_heads=2),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_a_direct_forward_whatever_the_batching(family):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**FAMILIES[family], max_seq_len=64)).eval()
    windows = random_windows(model.config.vocab_size)
    expected = [direct_logprob(model, t, n) for t, n in windows]
    for batch_size in (1, 4, 16):
        got = [s for s, _ in score_windows(model, windows, batch_size=batch_size, pad_id=0)]
        assert got == pytest.approx(expected, abs=1e-4)
    order = list(reversed(range(len(windows))))
    shuffled = score_windows(model, [windows[i] for i in order], batch_size=4, pad_id=0)
    assert [s for s, _ in shuffled] == pytest.approx([expected[i] for i in order], abs=1e-4)


def test_is_greedy_is_true_only_for_the_greedy_continuation(tiny_model):
    tokens = [1, 7, 9, 4]
    with torch.no_grad():
        for _ in range(5):  # extend greedily, one token at a time
            tokens.append(int(tiny_model(torch.tensor([tokens]))[0, -1].argmax()))
    greedy = (tokens, 5)
    wrong_last = (tokens[:-1] + [(tokens[-1] + 1) % 61], 5)
    wrong_first = (tokens[:4] + [(tokens[4] + 1) % 61] + tokens[5:], 5)
    flags = [g for _, g in score_windows(tiny_model, [greedy, wrong_last, wrong_first], batch_size=3, pad_id=0)]
    assert flags == [True, False, False]


def test_encode_pair_follows_lm_eval(scorer):
    tok = scorer.tokenizer
    context, continuation = encode_pair(tok, "little tom went ", "to the market")
    assert context == [tok.bos_id, *tok.encode("little tom went")]  # the trailing space moved on
    assert continuation == tok.encode(" to the market")
    assert encode_pair(tok, "", "tom") == ([tok.bos_id], tok.encode("tom"))


def test_long_contexts_are_cut_from_the_left(scorer):
    context, continuation = list(range(10, 90)), [5, 6, 7]
    [(tokens, n)] = continuation_windows([(context, continuation)], span=scorer.span)
    assert len(tokens) == scorer.max_len + 1 and n == 3 and tokens[-3:] == continuation
    assert tokens == (context + continuation)[-(scorer.max_len + 1):]


def test_loglikelihood_of_text_equals_direct_sum(scorer):
    tok = scorer.tokenizer
    [(logprob, _)] = scorer.loglikelihood([("little ann went", " to the market")], batch_size=2)
    ids = [tok.bos_id, *tok.encode("little ann went to the market")]
    assert logprob == pytest.approx(direct_logprob(scorer.model, ids, len(tok.encode(" to the market"))), abs=1e-4)


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 13])
def test_rolling_windows_score_every_token_exactly_once(length):
    ids, span = list(range(100, 100 + length)), 5
    windows = rolling_windows(ids, prefix_id=1, span=span)
    scored = [t for tokens, n in windows for t in tokens[len(tokens) - n:]]
    assert scored == ids
    full = [1, *ids]
    for tokens, n in windows:  # each window is a run of the text with the most context that fits
        start = full.index(tokens[-1]) + 1 - len(tokens)
        assert len(tokens) <= span and tokens == full[start:start + len(tokens)]
    assert all(len(t) == span for t, _ in windows[1:])
    assert len(windows) == math.ceil(length / (span - 1))  # each window scores all it can


def test_rolling_loglikelihood_short_and_long_texts(scorer, tmp_path):
    tok = scorer.tokenizer
    short = "little tom went to the market."
    ids = [tok.bos_id, *tok.encode(short)]
    [total] = scorer.loglikelihood_rolling([short], batch_size=4)
    assert total == pytest.approx(direct_logprob(scorer.model, ids, len(ids) - 1), abs=1e-4)

    narrow = Scorer(scorer.model, tok, max_len=6)  # a text of many windows
    long = " ".join(TEXTS[:3])
    windows = rolling_windows(tok.encode(long), tok.bos_id, narrow.span)
    assert len(windows) > 3
    expected = sum(direct_logprob(scorer.model, t, n) for t, n in windows)
    for batch_size in (1, 8):
        [got_long, got_short] = narrow.loglikelihood_rolling([long, short], batch_size=batch_size)
        assert got_long == pytest.approx(expected, abs=1e-3)


def test_diffusion_checkpoint_gives_a_seeded_bound_and_says_so(tmp_path, caplog):
    path = save_tiny_checkpoint(tmp_path / "d", tokenizer="char", objective="diffusion")
    with caplog.at_level(logging.WARNING, logger="psann.lm"):
        scorer = Scorer.load(path, mc_draws=4)
    assert "lower bound" in caplog.text
    mask = scorer.diffusion.mask_id
    seen = []
    forward = scorer.model.forward
    scorer.model.forward = lambda x, **kw: (seen.append(x.clone()), forward(x, **kw))[1]
    windows = [([1, 6, 7, 8, 9, 5, 6], 4), ([1, 5, 6, 7, 8], 2), ([1, 9, 5], 1)]  # longest first: batch order
    first = score_windows(scorer.model, windows, batch_size=3, pad_id=0, diffusion=scorer.diffusion)
    for x in seen:  # the context (everything before the scored tokens) is never masked
        for row, (tokens, n) in enumerate(windows):
            assert not (x[row, :len(tokens) - n] == mask).any()
    assert len(seen) == 4 + 1  # one forward per draw, one for is_greedy
    scorer.model.forward = forward
    again = score_windows(scorer.model, windows[::-1], batch_size=1, pad_id=0, diffusion=scorer.diffusion)
    assert [s for s, _ in again[::-1]] == pytest.approx([s for s, _ in first], abs=1e-4)
    other_seed = MonteCarlo(mask, draws=4, seed=1)
    changed = score_windows(scorer.model, windows, batch_size=3, pad_id=0, diffusion=other_seed)
    assert changed[2][0] == pytest.approx(first[2][0], abs=1e-4)  # one scored token: always the same mask
    assert changed[0][0] != pytest.approx(first[0][0], abs=1e-4)
    with torch.no_grad():  # one scored token: the bound is that token's log-prob with it masked
        logits = scorer.model(torch.tensor([[1, 9, mask]]))
    assert first[2][0] == pytest.approx(float(logits.log_softmax(-1)[0, 2, 5]), abs=1e-4)
    assert all(s <= 0 for s, _ in first)


def write_mc(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


MC_ROWS = [{"query": f"little {w} went to the", "choices": ["market.", "moon and the stars", "tom"], "gold": g}
           for w, g in (("tom", 0), ("ann", 1), ("ann", 2), ("tom", 0))]


def test_score_rows_picks_the_best_choice_three_ways(scorer):
    result = score_rows(scorer, MC_ROWS, batch_size=5)
    pairs = [(r["query"], " " + c) for r in MC_ROWS for c in r["choices"]]
    lls = [ll for ll, _ in scorer.loglikelihood(pairs, batch_size=1)]
    acc = acc_norm = 0
    for k, row in enumerate(MC_ROWS):
        ll = lls[3 * k:3 * k + 3]
        acc += max(range(3), key=lambda i: (ll[i], -i)) == row["gold"]
        acc_norm += max(range(3), key=lambda i: (ll[i] / len(row["choices"][i]), -i)) == row["gold"]
    assert result["questions"] == 4 and result["chance"] == pytest.approx(1 / 3)
    assert result["acc"] == acc / 4 and result["acc_norm"] == acc_norm / 4


def test_eval_mc_command(ckpt, scorer, tmp_path, capsys):
    data = write_mc(tmp_path / "toy.jsonl", MC_ROWS)
    assert cli(["eval", "mc", "--ckpt", ckpt, "--data", data, "--limit", "3", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = score_rows(scorer, MC_ROWS[:3], batch_size=8)
    assert out["questions"] == 3 and out["acc"] == expected["acc"] and out["bound"] is False

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a"], "gold": 0}\n')
    assert cli(["eval", "mc", "--ckpt", ckpt, "--data", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err

    for option in ("--limit", "--batch-size", "--mc-draws"):
        with pytest.raises(SystemExit):  # argparse's error: exit 2 with the option named
            cli(["eval", "mc", "--ckpt", ckpt, "--data", data, option, "0"])
        assert f"{option} must be at least 1" in capsys.readouterr().err


def test_diffusion_bound_is_unbiased_for_the_exact_conditional_elbo(tmp_path):
    """Enumerate every mask set of a 3-token continuation: the exact conditional ELBO is
    (1/n) sum_l (n/l) mean_{|S|=l} sum_{i in S} log p(x_i | x with S masked); the Monte-Carlo
    estimates over many seeds must centre on it."""
    from itertools import combinations

    scorer = Scorer.load(save_tiny_checkpoint(tmp_path / "d", tokenizer="char", objective="diffusion"), mc_draws=3)
    mask, tokens, n = scorer.diffusion.mask_id, [1, 9, 5, 6], 3
    exact = 0.0
    with torch.no_grad():
        for size in range(1, n + 1):
            subsets = list(combinations(range(len(tokens) - n, len(tokens)), size))
            for subset in subsets:
                x = torch.tensor([[mask if i in subset else t for i, t in enumerate(tokens)]])
                logprobs = scorer.model(x).log_softmax(-1)[0]
                exact += (n / size) / len(subsets) / n * sum(float(logprobs[i, tokens[i]]) for i in subset)
    estimates = [score_windows(scorer.model, [(tokens, n)], batch_size=1, pad_id=0,
                               diffusion=MonteCarlo(mask, draws=3, seed=seed))[0][0] for seed in range(150)]
    mean = sum(estimates) / len(estimates)
    se = math.sqrt(sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1) / len(estimates))
    assert abs(mean - exact) < 4 * se + 1e-6 and se > 0  # masks differ by seed, the mean does not drift
