"""Data at scale: sources -> filters -> shards -> loader, resume, ranks, streaming."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from psann.lm.data.build import STATE_FILE, BuildConfig, build_dataset
from psann.lm.data.tokens import INDEX_FILE, ShardWriter
from psann.lm.data.demo_corpus import generate_stories
from psann.lm.data.filters import FilterConfig
from psann.lm.data.shards import Loader, Windows
from psann.lm.data.shards import ShardedTokens, get_batch
from psann.lm.data.sources import resolve_inputs
from psann.lm.data.streaming import StreamingLMDataset
from psann.lm.errors import CheckpointError, DataError
from psann.lm.tokenizers import load_tokenizer
from psann.lm.tokenizers.bpe import BPETokenizer

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    BPETokenizer.train(generate_stories(200, seed=1), vocab_size=600).save(d)
    return d


def _build(tmp_path, inputs, tok_dir, **kw):
    filters = kw.pop("filters", FilterConfig())
    cfg = BuildConfig(inputs=[str(i) for i in inputs], tokenizer=str(tok_dir), out=str(tmp_path / kw.pop("name", "out")),
                      progress=False, filters=filters, **kw)
    return build_dataset(cfg), cfg


def _decode_docs(out, split="train"):
    data = ShardedTokens(out, split)
    tok = load_tokenizer(out / "tokenizer")
    starts = list(data.doc_starts()) + [data.n_tokens]
    return [tok.decode(data.read(a, b).tolist(), skip_special_tokens=True) for a, b in zip(starts, starts[1:])]


def test_round_trip_all_source_kinds(tmp_path, tok_dir):
    docs = generate_stories(30, seed=5)
    (tmp_path / "a.txt").write_text(EOT.join(docs[:10]), encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        for d in docs[10:20]:
            fh.write(json.dumps({"body": d}) + "\n")
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("\n\n".join(docs[20:]).encode()))
    index, _ = _build(tmp_path, [tmp_path / "a.txt"], tok_dir, separator="eot", val_fraction=0.0, name="a")
    assert _decode_docs(tmp_path / "a") == docs[:10]
    _build(tmp_path, [tmp_path / "b.jsonl.gz"], tok_dir, text_key="body", val_fraction=0.0, name="b")
    assert _decode_docs(tmp_path / "b") == docs[10:20]
    _build(tmp_path, [tmp_path / "c.txt.zst"], tok_dir, separator="blank", val_fraction=0.0, name="c")
    assert _decode_docs(tmp_path / "c") == docs[20:]
    # Documents are wrapped BOS ... EOS; the index describes the shards.
    data = ShardedTokens(tmp_path / "a")
    assert data.read(0, 1)[0] == index["bos_id"] and data.read(data.n_tokens - 1, data.n_tokens)[0] == index["eos_id"]
    assert index["dtype"] == "uint16" and index["documents"]["kept"]["train"] == 10


def test_parquet_manifest_and_val_split(tmp_path, tok_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = generate_stories(200, seed=6)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    (tmp_path / "list.txt").write_text("# shards\nd.parquet\n", encoding="utf-8")
    index, _ = _build(tmp_path, [], tok_dir, manifests=[str(tmp_path / "list.txt")], val_fraction=0.2, seed=3)
    train, val = _decode_docs(tmp_path / "out"), _decode_docs(tmp_path / "out", "val")
    assert 20 <= len(val) <= 60 and sorted(train + val) == sorted(docs)  # every document once, split by document
    assert index["documents"]["kept"] == {"train": len(train), "val": len(val)}


def test_hf_dataset_code_path_on_a_local_dataset(tmp_path, tok_dir):
    pytest.importorskip("datasets")
    docs = generate_stories(12, seed=8)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"story": d}) + "\n" for d in docs), encoding="utf-8")
    index, _ = _build(tmp_path, [], tok_dir, hf_dataset=str(tmp_path / "ds"), hf_text_key="story", val_fraction=0.0)
    assert _decode_docs(tmp_path / "out") == docs
    assert index["sources"] == [f"hf:{tmp_path / 'ds'}:train"]


def test_filters_dedup_and_decontamination(tmp_path, tok_dir):
    base = generate_stories(40, seed=9)
    near = base[0].replace(".", "!", 1) + " The end."       # a near-duplicate of base[0]
    exact = "  " + base[1].upper() + "  "                   # the same text after normalisation
    leaked = "Some words first. " + "the quick brown fox jumps over the lazy dog near the old river bank today"
    french = "Il était une fois un petit chat qui aimait beaucoup jouer dans le jardin avec ses amis."
    docs = base + [near, exact, leaked, french, "ok"]
    (tmp_path / "in.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text(json.dumps(
        {"ctx": "The quick brown fox jumps over the lazy dog near the old river bank today, said Tom."}) + "\n")
    filters = FilterConfig(min_chars=5, english=True, exact_dedup=True, near_dedup=True,
                           decontaminate=[str(tmp_path / "eval.jsonl")])
    index, _ = _build(tmp_path, [tmp_path / "in.txt"], tok_dir, separator="blank", val_fraction=0.0, filters=filters)
    kept = _decode_docs(tmp_path / "out")
    assert kept == base  # every distinct story kept; each planted problem removed by its filter
    assert index["removed"] == {"min_chars": 1, "english": 1, "decontaminate": 1, "exact_dedup": 1, "near_dedup": 1}
    assert set(index["filters"]) == set(index["removed"])


def test_deterministic_across_workers_and_npy_export(tmp_path, tok_dir):
    (tmp_path / "in.txt").write_text(EOT.join(generate_stories(300, seed=2)), encoding="utf-8")
    a, _ = _build(tmp_path, [tmp_path / "in.txt"], tok_dir, separator="eot", workers=1, shard_tokens=3000,
                  batch_docs=16, name="w1")
    b, _ = _build(tmp_path, [tmp_path / "in.txt"], tok_dir, separator="eot", workers=2, shard_tokens=3000,
                  batch_docs=16, npy=True, name="w2")
    assert a["shards"] == b["shards"] and len(a["shards"]["train"]) > 3
    for shard in a["shards"]["train"]:
        assert (tmp_path / "w1" / shard["file"]).read_bytes() == (tmp_path / "w2" / shard["file"]).read_bytes()
    first = a["shards"]["train"][0]
    assert np.array_equal(np.load(tmp_path / "w2" / first["file"].replace(".bin", ".npy")),
                          np.fromfile(tmp_path / "w1" / first["file"], dtype=np.uint16))


def test_interrupted_build_resumes_to_the_same_result(tmp_path, tok_dir, monkeypatch):
    (tmp_path / "in.txt").write_text("\n\n".join(generate_stories(300, seed=4) * 2), encoding="utf-8")
    kw = dict(separator="blank", shard_tokens=4000, batch_docs=8, filters=FilterConfig(exact_dedup=True))
    whole, _ = _build(tmp_path, [tmp_path / "in.txt"], tok_dir, name="whole", **kw)
    closes = []
    real_close = ShardWriter.close

    def failing_close(self):
        closes.append(self.name)
        if len(closes) == 4:
            raise KeyboardInterrupt  # interrupted after a few finished shards
        return real_close(self)

    monkeypatch.setattr(ShardWriter, "close", failing_close)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, [tmp_path / "in.txt"], tok_dir, name="cut", **kw)
    monkeypatch.setattr(ShardWriter, "close", real_close)
    cut = tmp_path / "cut"
    assert (cut / STATE_FILE).exists() and not (cut / INDEX_FILE).exists() and not list(cut.glob("*.tmp"))
    resumed, _ = _build(tmp_path, [tmp_path / "in.txt"], tok_dir, name="cut", **kw)
    assert resumed["shards"] == whole["shards"] and resumed["removed"] == whole["removed"]
    for shard in whole["shards"]["train"]:
        assert (cut / shard["file"]).read_bytes() == (tmp_path / "whole" / shard["file"]).read_bytes()
    assert not (cut / STATE_FILE).exists()
    with pytest.raises(DataError, match="already holds a finished dataset"):
        _build(tmp_path, [tmp_path / "in.txt"], tok_dir, name="cut", **kw)


def test_disk_full_keeps_finished_shards_and_resumes(tmp_path, tok_dir, monkeypatch):
    import errno

    (tmp_path / "in.txt").write_text("\n\n".join(generate_stories(200, seed=5)), encoding="utf-8")
    kw = dict(separator="blank", shard_tokens=3000, batch_docs=8)
    whole, _ = _build(tmp_path, [tmp_path / "in.txt"], tok_dir, name="whole", **kw)
    adds = []
    real_add = ShardWriter.add

    def add_until_full(self, ids):
        adds.append(1)
        if len(adds) == 120:  # past the first finished shard, in the middle of another
            self.fh.write(ids.tobytes()[:7])  # a partial write, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, ids)

    monkeypatch.setattr(ShardWriter, "add", add_until_full)
    with pytest.raises(DataError, match="disk full .* finished shards are kept"):
        _build(tmp_path, [tmp_path / "in.txt"], tok_dir, name="full", **kw)
    monkeypatch.setattr(ShardWriter, "add", real_add)
    full = tmp_path / "full"
    assert not list(full.glob("*.tmp")) and not (full / INDEX_FILE).exists()
    finished = json.loads((full / STATE_FILE).read_text())["shards"]["train"]
    assert finished and all((full / s["file"]).stat().st_size == 2 * s["tokens"] for s in finished)
    resumed, _ = _build(tmp_path, [tmp_path / "in.txt"], tok_dir, name="full", **kw)
    assert resumed["shards"] == whole["shards"]
    assert _decode_docs(full) == _decode_docs(tmp_path / "whole")


def test_bad_input_is_named(tmp_path, tok_dir):
    with pytest.raises(DataError, match=r"2 input\(s\) missing.*nope1.*nope2"):
        resolve_inputs([str(tmp_path / "nope1.txt"), str(tmp_path / "nope2.txt")])
    (tmp_path / "m.txt").write_text("missing.txt\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing.txt"):
        resolve_inputs([], [str(tmp_path / "m.txt")])
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe here\n\n\n\nmore text")
    index, _ = _build(tmp_path, [tmp_path / "bad.txt"], tok_dir, separator="blank", val_fraction=0.0)
    assert index["documents"]["invalid_utf8_replaced"] == 2 and index["documents"]["empty_skipped"] == 1
    with pytest.raises(DataError, match="another tokenizer"):
        ShardedTokens(tmp_path / "out", expected_fingerprint="0000")


def _shards(tmp_path, tok_dir, n=200):
    (tmp_path / "in.txt").write_text(EOT.join(generate_stories(n, seed=7)), encoding="utf-8")
    _build(tmp_path, [tmp_path / "in.txt"], tok_dir, separator="eot", shard_tokens=2000, val_fraction=0.0, name="sh")
    return ShardedTokens(tmp_path / "sh")


@pytest.mark.parametrize("mode", ["random", "sequential"])
@pytest.mark.parametrize("aligned", [False, True])
def test_loader_resumes_exactly(tmp_path, tok_dir, mode, aligned):
    data = _shards(tmp_path, tok_dir)
    a = Loader(Windows(data, 32), 4, seed=3, mode=mode, bos_aligned=aligned)
    for _ in range(5):
        a.next_batch()
    b = Loader(Windows(data, 32), 4, seed=3, mode=mode, bos_aligned=aligned)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # y is x shifted by one
        if aligned:
            assert (xa[:, 0] == data.bos_id).all()
    with pytest.raises(CheckpointError, match="seed"):
        Loader(Windows(data, 32), 4, seed=4, mode=mode, bos_aligned=aligned).load_state_dict(a.state_dict())


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_rank_splits_are_disjoint_complete_and_world_size_free(tmp_path, tok_dir, mode):
    data = _shards(tmp_path, tok_dir)
    world, B, L = 3, 2, 32
    ranks = [Loader(Windows(data, L), B, mode=mode, seed=1, rank=r, world_size=world) for r in range(world)]
    single = Loader(Windows(data, L), B * world, mode=mode, seed=1)
    steps = data.n_tokens // L // (B * world)  # one epoch of sequential windows
    seen = [[] for _ in range(world)]
    for _ in range(steps):
        for r, loader in enumerate(ranks):
            seen[r] += loader._window_starts().tolist()
        rows = [loader.next_batch()[0] for loader in ranks]
        assert torch.equal(torch.cat(rows), single.next_batch()[0])  # the same global batch, split
    if mode == "sequential":
        starts = [set(s) for s in seen]
        assert all(not (starts[i] & starts[j]) for i in range(world) for j in range(i + 1, world))
        assert sum(map(len, starts)) == steps * B * world
    # resuming under another world size continues the same global stream
    two = [Loader(Windows(data, L), B * world // 2 if world % 2 == 0 else B, mode=mode, seed=1, rank=r, world_size=2)
           for r in range(2)]
    state = single.state_dict()
    for loader in two:
        loader.load_state_dict(state)
    x_single = single.next_batch()[0]
    two_rows = torch.cat([loader.next_batch()[0] for loader in two])
    assert torch.equal(two_rows, x_single[:len(two_rows)])


def test_get_batch(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    x, y = get_batch(tokens, 8, 10, "cpu")
    assert x.shape == (8, 10) and x.dtype == torch.long and torch.equal(y, x + 1)
    with pytest.raises(RuntimeError):
        get_batch(tokens, 2, 10, "no_such_device")
    with pytest.raises(DataError):
        get_batch(tokens[:5], 2, 10, "cpu")


def test_streaming_dataset_covers_each_file_once(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    files = []
    for i in range(4):
        files.append(tmp_path / f"s{i}.txt")
        files[-1].write_text(EOT.join(generate_stories(10, seed=20 + i)), encoding="utf-8")
    (tmp_path / "manifest.txt").write_text("\n".join(f.name for f in files), encoding="utf-8")
    full = list(StreamingLMDataset(str(tmp_path / "manifest.txt"), tok, 16, separator="eot"))
    split = [list(StreamingLMDataset(str(tmp_path / "manifest.txt"), tok, 16, separator="eot", rank=r, world_size=2))
             for r in range(2)]
    assert all(torch.equal(x[1:], y[:-1]) for x, y in full)
    assert 0 < len(split[0]) < len(full) and 0 < len(split[1]) < len(full)
    ids = np.concatenate([x.numpy() for x, _ in full] + [full[-1][1][-1:].numpy()])
    expected = np.concatenate([tok.encode(d, add_bos=True, add_eos=True)
                               for f in files for d in f.read_text(encoding="utf-8").split(EOT)])
    assert np.array_equal(ids, expected[:len(ids)])


def test_training_on_a_built_dataset_resumes_exactly(tmp_path, tok_dir):
    from safetensors.torch import load_file

    from psann.lm import psannLM, psannLMDataPrep

    (tmp_path / "in.txt").write_text(EOT.join(generate_stories(150, seed=11)), encoding="utf-8")
    _build(tmp_path, [tmp_path / "in.txt"], tok_dir, separator="eot", shard_tokens=3000, val_fraction=0.1, name="ds")
    dp = psannLMDataPrep.from_built(tmp_path / "ds", max_length=32, sampling="sequential", bos_aligned=True, seed=5)
    assert dp.val_windows is not None and dp.tokenizer.vocab_size == load_tokenizer(tok_dir).vocab_size
    opts = dict(max_steps=6, batch_tokens=128, lr=3e-3, warmup_steps=1, progress=False, plot=False, eval_interval_steps=0,
                eval_batches=2)
    model = dict(d_model=32, n_layers=1, n_heads=2)
    psannLM(**model).fit(dp, checkpoint_dir=str(tmp_path / "a"), save_interval_steps=3, **opts)
    psannLM(**model).fit(dp, checkpoint_dir=str(tmp_path / "b"),
                         resume_from=str(tmp_path / "a" / "checkpoints" / "step_0000003"), **opts)
    a = load_file(tmp_path / "a/checkpoints/final/model.safetensors")
    b = load_file(tmp_path / "b/checkpoints/final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "b/checkpoints/final/trainer_state.json").read_text())
    assert state["loader"]["mode"] == "sequential" and state["loader"]["consumed"] == 6 * 4


def test_hf_streaming_dataset_filters_caps_and_shards_rows(tmp_path, tok_dir):
    pytest.importorskip("datasets")
    from psann.lm.data.filters import FilterConfig
    from psann.lm.data.streaming import HFTextStreamingLMDataset

    tok = load_tokenizer(tok_dir)
    stories = generate_stories(12, seed=5)
    rows = stories[:6] + [stories[0], "  ", stories[1].upper()] + stories[6:]  # a repeat, an empty row, a variant
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"story": r}) + "\n" for r in rows))

    def ids(dataset):
        windows = list(dataset)
        return np.concatenate([x.numpy() for x, _ in windows] + [windows[-1][1][-1:].numpy()])

    def expected(texts):
        return np.concatenate([tok.encode(t, add_bos=True, add_eos=True) for t in texts])

    dedup = HFTextStreamingLMDataset(str(tmp_path / "ds"), tok, 16, text_key="story",
                                     filters=FilterConfig(exact_dedup=True))
    got = ids(dedup)
    kept = [r for i, r in enumerate(rows) if i not in (6, 7, 8)]  # exact dedup normalises case; 7 is empty
    assert np.array_equal(got, expected(kept)[:len(got)]) and dedup.removed == {"exact_dedup": 2}
    capped = ids(HFTextStreamingLMDataset(str(tmp_path / "ds"), tok, 16, text_key="story", max_samples=3))
    assert np.array_equal(capped, expected(rows[:3])[:len(capped)]) and len(capped) > len(expected(rows[:2]))
    shares = [HFTextStreamingLMDataset(str(tmp_path / "ds"), tok, 16, text_key="story", rank=r, world_size=2,
                                       max_samples=6) for r in range(2)]
    assert all(np.array_equal(ids(s), expected(rows[r:6:2])[:len(ids(s))])
                                                   for r, s in enumerate(shares))
    with pytest.raises(ValueError, match="max_samples"):
        HFTextStreamingLMDataset("x", tok, 16, max_samples=0)
