"""Byte-level BPE tokenizer: tiktoken engine vs reference, streaming, files, HF export."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("tiktoken")

from psann.lm.data.demo_corpus import generate_stories  # noqa: E402
from psann.lm.errors import DataError  # noqa: E402
from psann.lm.tokenizers.base import META_FILE  # noqa: E402
from psann.lm.tokenizers.bpe import BPETokenizer  # noqa: E402
from psann.lm.tokenizers.bpe_train import train_bpe  # noqa: E402
from psann.lm.tokenizers.gpt2_bytes import bytes_to_unicode, str_to_token, token_to_str  # noqa: E402

EOT = "<|endoftext|>"
EXTRA = "<|endoftext|><|endoftext|>"

TEXTS = [
    "",
    "Hello world",
    "Once upon a time, there was a little cat named Tom.",
    "  leading spaces and trailing   ",
    "tabs\t\tand\nnewlines\n\n\n   \n  x",
    "don't won't I'm you're we've they'll he'd IT'S",
    "numbers 12345 and 3.14159 and 1,000,000",
    "emoji 🐱🐶 and accents café naïve 日本語のテキスト",
    f"first story{EOT}second story{EOT}",
    f"{EOT}{EOT}{EOT}",
    f"partial <|endoftext| and <|endo and {EOT[:-1]}",
    "a" * 300 + " " * 50 + "b",
    "mixed\u00a0nbsp\u2003em-space  \r\n windows",
    "punctuation!!! ??? ... --- ((()))",
]


def _corpus() -> str:
    stories = generate_stories(120, seed=3)
    extra = [
        "Emoji 🐱🐶🎉 and café, naïve, 日本語.",
        "Spaces    runs\t\ttabs\n\n\nnewlines   ",
        "Digits 0123456789 2024 3.14 and don't can't we'll I've",
    ]
    return EOT.join(stories + extra * 5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "corpus.txt"
    path.write_text(_corpus(), encoding="utf-8")
    vocab, merges = train_bpe(path, 600, [EOT], num_workers=1, progress=False)
    return vocab, merges


@pytest.fixture(scope="module")
def tok(trained):
    vocab, merges = trained
    return BPETokenizer(vocab, merges, [EOT])


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = ["the", " cat", "  ", "\n", "\t", " 42", "'s", "'ll", "🐱", "é", "日本", "!!", EOT, "<|",
              "endoftext", "|>", " ", "   ", "Tom", "ran", ".", ","]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_special_roles_and_layout(tok, trained):
    vocab, merges = trained
    assert tok.eos_id == 0 and tok.special_token_ids[EOT] == 0
    # bos/pad get new tokens at the end, since the three role ids must be distinct.
    assert tok.special_token_ids["<|bos|>"] == len(vocab)
    assert tok.special_token_ids["<|pad|>"] == len(vocab) + 1
    assert tok.vocab_size == len(vocab) + 2
    assert tok.unk_id is None
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert len(merges) == 600 - 257


def test_tiktoken_matches_reference(tok, trained):
    vocab, _ = trained
    texts = TEXTS + _random_texts(150, seed=1) + generate_stories(10, seed=99)
    for text in texts:
        ids = tok.encode(text)
        assert ids == tok.encode_reference(text), text
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_round_trip_and_no_eos(tok):
    for text in TEXTS + _random_texts(50, seed=2):
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # the default keeps special tokens
        if not text.endswith(EOT):
            assert not ids or ids[-1] != tok.eos_id
    ids = tok.encode("hello", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special_tokens=True) == "hello"


def test_specials_never_split(tok):
    ids = tok.encode(f"a{EOT}b")
    assert ids.count(tok.eos_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    # Merged text around a special never absorbs it.
    assert tok.encode(f"x{EOT}") == tok.encode("x") + [tok.eos_id]
    assert tok.encode(f"{EOT}x") == [tok.eos_id] + tok.encode("x")
    assert tok.encode("<|bos|>") == [tok.bos_id]


def test_overlapping_specials_longest_wins(trained):
    vocab, merges = trained
    t = BPETokenizer(vocab, merges, [EOT, EXTRA])
    double = t.special_token_ids[EXTRA]
    assert t.encode(EOT + EOT) == [double]
    assert t.encode(EOT * 3) == [double, t.eos_id]
    assert t.encode(f"a{EOT}{EOT}b") == t.encode("a") + [double] + t.encode("b")
    for text in TEXTS + _random_texts(60, seed=5):
        assert t.encode(text) == t.encode_reference(text)
        assert t.decode(t.encode(text), skip_special_tokens=False) == text
        assert list(t.encode_iterable([text[i:i + 3] for i in range(0, len(text), 3)],
                                      buffer_chars=1)) == t.encode(text)


def test_encode_iterable_any_chunking(tok):
    rng = random.Random(1234)
    texts = TEXTS + _random_texts(40, seed=7) + ["\n\n".join(generate_stories(5, seed=4))]
    for text in texts:
        expected = tok.encode(text)
        for _ in range(15):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 30))))
            chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            for buffer_chars in (1, 7, 4096):
                got = list(tok.encode_iterable(iter(chunks), buffer_chars=buffer_chars))
                assert got == expected, (text, chunks, buffer_chars)
    # Splitting inside a special token and inside a whitespace run.
    text = f"abc   {EOT}   def"
    for i in range(len(text) + 1):
        got = list(tok.encode_iterable([text[:i], text[i:]], buffer_chars=1))
        assert got == tok.encode(text)
    chars = list(text)  # one character at a time
    assert list(tok.encode_iterable(chars, buffer_chars=1)) == tok.encode(text)


def test_encode_iterable_is_lazy(tok):
    def gen():
        for _ in range(2000):
            yield "the cat sat on the mat. "
        raise AssertionError("read too far")  # never reached if the caller stops early

    stream = tok.encode_iterable(gen(), buffer_chars=64)
    first = [next(stream) for _ in range(10)]
    assert first == tok.encode("the cat sat on the mat. " * 3)[:10]


def test_any_id_numbering_gives_the_same_tokens(tok, trained):
    """Ids that do not grow in merge order take the rank -> id mapping path; same tokens result."""
    vocab, merges = trained
    new_ids = list(vocab)
    random.Random(4).shuffle(new_ids)
    renumbered = {new: vocab[old] for old, new in zip(vocab, new_ids)}
    t = BPETokenizer(renumbered, merges, [EOT])
    assert tok._rank_to_id is None and t._rank_to_id is not None  # both engine paths are exercised
    for text in TEXTS + _random_texts(40, seed=21):
        ids = t.encode(text)
        assert ids == t.encode_reference(text)
        assert [t._id_bytes_list[i] for i in ids] == [tok._id_bytes_list[i] for i in tok.encode(text)]
    assert t.encode_batch(TEXTS) == [t.encode(x) for x in TEXTS]


def test_encode_batch_matches_encode(tok):
    texts = TEXTS + _random_texts(30, seed=9)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(["hi"], add_eos=True) == [tok.encode("hi") + [tok.eos_id]]


def test_decode_never_raises(tok):
    bad = [tok._bytes_to_id[bytes([0xFF])], tok._bytes_to_id[bytes([0xC3])]]
    assert "\ufffd" in tok.decode(bad)
    assert tok.decode([tok.vocab_size, -1, 10**9]) == "\ufffd" * 3
    emoji = tok.encode("🐱")
    assert tok.decode(emoji[:1] + tok.encode("x")).endswith("x")


def test_byte_unicode_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120"  # 'Ġ'
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    raw = bytes(range(256))
    assert str_to_token(token_to_str(raw)) == raw


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    for name in ("vocab.json", "merges.txt", "special_tokens.json", META_FILE):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[0] == "#version: 0.2"
    again = BPETokenizer.load(tmp_path)
    assert (again.pad_id, again.bos_id, again.eos_id, again.vocab_size) == (
        tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size)
    texts = TEXTS + _random_texts(40, seed=11)
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    # Saving again is byte-identical (fingerprints rely on it).
    other = tmp_path / "again"
    again.save(other)
    for name in ("vocab.json", "merges.txt", "special_tokens.json", META_FILE):
        assert (other / name).read_bytes() == (tmp_path / name).read_bytes()


def test_from_files_gpt2_layout(tok, trained, tmp_path):
    tok.save(tmp_path)
    plain = BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    texts = TEXTS + _random_texts(40, seed=13)
    assert [plain.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    # GPT-2's own layout: bytes in table order, merges, then <|endoftext|> last.
    vocab, merges = trained
    table = bytes_to_unicode()
    gpt2_vocab = {table[b]: i for i, b in enumerate(sorted(range(256), key=lambda b: ord(table[b])))}
    for a, b in merges:
        gpt2_vocab.setdefault(token_to_str(a + b), len(gpt2_vocab))
    gpt2_vocab[EOT] = len(gpt2_vocab)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "vocab.json").write_text(json.dumps(gpt2_vocab), encoding="utf-8")
    (tmp_path / "g" / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{token_to_str(a)} {token_to_str(b)}\n" for a, b in merges),
        encoding="utf-8")
    g = BPETokenizer.from_files(tmp_path / "g" / "vocab.json", tmp_path / "g" / "merges.txt")
    assert g.eos_id == gpt2_vocab[EOT]
    assert g.bos_id == len(gpt2_vocab) and g.pad_id == len(gpt2_vocab) + 1
    inverse = {i: str_to_token(s) for s, i in gpt2_vocab.items()}
    for text in texts:
        ids = g.encode(text)
        assert ids == g.encode_reference(text)
        # Same tokens as ours, only renumbered.
        assert [inverse[i] for i in ids] == [vocab[i] for i in tok.encode(text)]
        assert g.decode(ids, skip_special_tokens=False) == text


def test_to_hf_identical_ids(tok, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tok.to_hf(tmp_path)
    assert (tmp_path / "special_tokens_map.json").is_file()
    hf = tokenizers.Tokenizer.from_file(str(path))
    texts = TEXTS + _random_texts(60, seed=17) + generate_stories(5, seed=8)
    for text in texts:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text), text
        assert hf.decode(tok.encode(text), skip_special_tokens=False) == text


def test_lone_surrogate_does_not_crash(tok):
    ids = tok.encode("a\ud800b")
    assert ids == tok.encode_reference("a\ud800b")
    assert tok.decode(ids) == "a\ufffdb"


def test_registry_backend_trains_saves_and_reloads(tmp_path):
    from psann.lm import psannLMDataPrep
    from psann.lm.tokenizers import load_tokenizer

    texts = generate_stories(40, seed=5)
    dp = psannLMDataPrep(texts, tokenizer="bpe", vocab_size=400, max_length=32)
    tok = dp.tokenizer
    assert tok.kind == "bpe" and tok.vocab_size <= 400
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert dp.train_windows.data.read(0, 1)[0] == tok.bos_id
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    sample = texts[0] + "<|endoftext|>" + texts[1]
    assert again.encode(sample) == tok.encode(sample) and tok.decode(tok.encode(texts[0])) == texts[0]


def test_hugging_face_round_trips_both_directions(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    stories = generate_stories(60, seed=11)
    corpus = tmp_path / "c.txt"
    corpus.write_text("<|endoftext|>".join(stories), encoding="utf-8")
    samples = [generate_stories(1, seed=77)[0], "Tabs\tand  spaces, café 🙂 123!", "a<|endoftext|>b"]

    # ours -> HF: tokenizers and transformers both load our tokenizer.json with identical ids
    vocab, merges = train_bpe(corpus, 500, ["<|endoftext|>"], progress=False)
    ours = BPETokenizer(vocab, merges, ["<|endoftext|>"])
    ours.to_hf(tmp_path / "ours_hf")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "ours_hf" / "tokenizer.json"))
    for text in samples:
        assert fast.encode(text, add_special_tokens=False) == ours.encode(text)
        assert BPETokenizer.from_hf(tmp_path / "ours_hf" / "tokenizer.json").encode(text) == ours.encode(text)

    # HF -> ours: a tokenizer trained by the HF library loads with identical ids
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train([str(corpus)], trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "hf.json"))
    loaded = BPETokenizer.from_hf(tmp_path / "hf.json")
    for text in samples:
        assert loaded.encode(text) == hf.encode(text).ids
    assert loaded.eos_id == hf.token_to_id("<|endoftext|>")


def test_from_hf_rejects_what_it_cannot_reproduce(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "ws.json"))
    with pytest.raises(DataError, match="unsupported pre-tokenizer"):
        BPETokenizer.from_hf(tmp_path / "ws.json")
    with pytest.raises(DataError, match="does not exist"):
        BPETokenizer.from_hf(tmp_path / "missing.json")


def test_registry_loads_bpe_from_hf_and_gpt2_files(tmp_path):
    from psann.lm.tokenizers import build_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("<|endoftext|>".join(generate_stories(30, seed=3)), encoding="utf-8")
    vocab, merges = train_bpe(corpus, 400, ["<|endoftext|>"], progress=False)
    ours = BPETokenizer(vocab, merges, ["<|endoftext|>"])
    ours.to_hf(tmp_path / "hf")
    ours.save(tmp_path / "saved")
    gpt2_dir = tmp_path / "gpt2"
    gpt2_dir.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (gpt2_dir / name).write_bytes((tmp_path / "saved" / name).read_bytes())
    text = generate_stories(1, seed=8)[0]
    for kind, path in (("bpe", tmp_path / "hf" / "tokenizer.json"), ("bpe", tmp_path / "hf"), ("auto", gpt2_dir)):
        tok = build_tokenizer(kind, model_path=str(path))
        assert tok.kind == "bpe" and tok.encode(text) == ours.encode(text)
