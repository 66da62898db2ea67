"""Faults of the data path, each injected and its outcome asserted: damaged datasets, concurrent
builds, full or unwritable disks, and a huge document streamed through the build (its encoding:
test_huge_documents.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import psann.lm.data.text as text_module
import psann.lm.data.tokens as tokens_module
from psann.lm.data.build import STATE_FILE, BuildConfig, build_dataset
from psann.lm.data.tokens import INDEX_FILE, SHARD_HASH, ShardWriter, scan_shard
from psann.lm.data.demo_corpus import generate_stories
from psann.lm.data.filters import FilterConfig
from psann.lm.data.shards import Loader, Windows
from psann.lm.data.shards import ShardedTokens
from psann.lm.errors import BusyError, DataError, StorageError
from psann.lm.tokenizers.bpe import BPETokenizer

EOT = "<|endoftext|>"
STORIES = generate_stories(120, seed=3)


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(STORIES, vocab_size=500)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, bpe):
    d = tmp_path_factory.mktemp("tok")
    bpe.save(d)
    return d


def _build(tmp_path, tok_dir, name="out", inputs=None, **kw):
    if inputs is None:
        inputs = [tmp_path / "in.txt"]
        if not inputs[0].exists():
            inputs[0].write_text(EOT.join(STORIES[:60]), encoding="utf-8")
    cfg = BuildConfig(inputs=[str(i) for i in inputs], tokenizer=str(tok_dir), out=str(tmp_path / name),
                      progress=False, separator=kw.pop("separator", "eot"), val_fraction=kw.pop("val_fraction", 0.0),
                      **kw)
    return build_dataset(cfg)


def _tokens(out, split="train"):
    data = ShardedTokens(out, split)
    return data.read(0, data.n_tokens)


def _edit_index(out, edit):
    index = json.loads((out / INDEX_FILE).read_text())
    edit(index)
    (out / INDEX_FILE).write_text(json.dumps(index))


# --- 1. datasets verify themselves ---------------------------------------------------------------
@pytest.mark.parametrize("damage,match", [
    (lambda p: p.write_text(p.read_text()[:40]), "not a valid dataset index"),          # truncated
    (lambda p: p.write_bytes(b"\xff\xfe not json"), "not a valid dataset index"),
    (lambda p: p.write_text("[1, 2]"), "holds a JSON list"),
    (lambda p: _edit_index(p.parent, lambda i: i.pop("shards")), "'shards' must map"),
    (lambda p: _edit_index(p.parent, lambda i: i.update(dtype="float64")), "'dtype' must be one of"),
    (lambda p: _edit_index(p.parent, lambda i: i["shards"]["train"][0].update(tokens="12")), "'tokens' must be"),
    (lambda p: _edit_index(p.parent, lambda i: i["shards"]["train"][0].update(file="../x.bin")), "must be a file name"),
    (lambda p: _edit_index(p.parent, lambda i: i.pop("vocab_size")), "'vocab_size' must be"),
])
def test_damaged_index_names_the_file_and_the_fix(tmp_path, tok_dir, damage, match):
    _build(tmp_path, tok_dir)
    damage(tmp_path / "out" / INDEX_FILE)
    with pytest.raises(DataError, match=match) as info:
        ShardedTokens(tmp_path / "out")
    assert str(tmp_path / "out" / INDEX_FILE) in str(info.value) and "rebuild the dataset" in str(info.value)


def test_shard_of_the_wrong_size_is_named(tmp_path, tok_dir):
    _build(tmp_path, tok_dir)
    shard = tmp_path / "out" / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="train_00000.bin is missing or has the wrong size"):
        ShardedTokens(tmp_path / "out")


def test_index_records_max_id_and_hash_of_each_shard(tmp_path, tok_dir):
    index = _build(tmp_path, tok_dir, shard_tokens=2000)
    assert len(index["shards"]["train"]) > 1
    for shard in index["shards"]["train"]:
        digest, top = scan_shard(tmp_path / "out" / shard["file"], np.dtype(index["dtype"]))
        assert shard[SHARD_HASH] == digest and shard["max_id"] == top < index["vocab_size"]


def test_flipped_bytes_are_caught_on_first_read(tmp_path, tok_dir):
    _build(tmp_path, tok_dir, shard_tokens=2000)
    shard = tmp_path / "out" / "train_00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[10], raw[11] = raw[11], raw[10] ^ 1  # same size, ids still inside the vocabulary or not
    shard.write_bytes(bytes(raw))
    data = ShardedTokens(tmp_path / "out")  # opening stays cheap: hashes are checked per shard, once
    data.read(0, 10)  # shard 0 is intact
    with pytest.raises(DataError, match=r"train_00001.bin is corrupt: its contents changed"):
        data.read(0, data.n_tokens)


def test_ids_outside_the_vocabulary_are_named_even_with_a_fixed_hash(tmp_path, tok_dir):
    _build(tmp_path, tok_dir)
    out = tmp_path / "out"
    shard = out / "train_00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[5] = 600  # the vocabulary has 500 ids
    ids.tofile(shard)
    digest, _ = scan_shard(shard, np.dtype(np.uint16))
    _edit_index(out, lambda i: i["shards"]["train"][0].update({SHARD_HASH: digest}))  # a crafted dataset
    data = ShardedTokens(out)
    with pytest.raises(DataError, match=r"train_00000.bin holds token id 600: the ids exceed the vocabulary"):
        Loader(Windows(data, 16), 2, mode="sequential").next_batch()
    _edit_index(out, lambda i: i["shards"]["train"][0].update(max_id=600))
    with pytest.raises(DataError, match="ids exceed the vocabulary"):  # from the index alone, on open
        ShardedTokens(out)


def test_old_index_without_hashes_still_loads_and_is_range_checked(tmp_path, tok_dir):
    _build(tmp_path, tok_dir)
    out = tmp_path / "out"
    whole = _tokens(out)

    def strip(index):
        for shard in index["shards"]["train"]:
            shard.pop("max_id"), shard.pop(SHARD_HASH)

    _edit_index(out, strip)
    assert np.array_equal(_tokens(out), whole)
    ids = np.fromfile(out / "train_00000.bin", dtype=np.uint16)
    ids[-1] = 65000
    ids.tofile(out / "train_00000.bin")
    with pytest.raises(DataError, match="holds token id 65000"):
        _tokens(out)


def test_data_verify_command(tmp_path, tok_dir, capsys):
    from psann.cli import main

    _build(tmp_path, tok_dir)
    assert main(["data", "verify", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    shard = tmp_path / "out" / "train_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0x40
    shard.write_bytes(bytes(raw))
    assert main(["data", "verify", str(tmp_path / "out")]) == 2
    assert "train_00000.bin is corrupt" in capsys.readouterr().err


def test_damaged_document_starts_are_named(tmp_path, tok_dir):
    _build(tmp_path, tok_dir)
    (tmp_path / "out" / "train_00000.docs.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"train_00000.docs.npy is missing or corrupt"):
        ShardedTokens(tmp_path / "out").doc_starts()


# --- 2. one writer per directory -----------------------------------------------------------------
def test_second_build_fails_at_once_naming_the_holder_and_a_killed_holder_never_blocks(tmp_path, tok_dir):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from psann.lm.files import DirectoryLock
        DirectoryLock({str(tmp_path / 'out')!r}, "data build").acquire()  # as a running build holds it
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(BusyError, match=rf"out is in use by another data build \(pid {holder.pid} on "):
            _build(tmp_path, tok_dir)
        assert time.monotonic() - start < 5 and not (tmp_path / "out" / INDEX_FILE).exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "out" / ".lock").exists()  # the file stays; the kernel dropped the lock
    assert _build(tmp_path, tok_dir)["tokens"]["train"] > 0


def test_temp_names_are_unique_and_dead_build_leftovers_are_cleaned(tmp_path, tok_dir):
    out = tmp_path / "out"
    out.mkdir()
    a, b = (ShardWriter(out, "train", 0, np.dtype(np.uint16), False) for _ in range(2))
    assert a.tmp != b.tmp and f"-{os.getpid()}-" in a.tmp.name and a.tmp.parent == out
    a.discard(), b.discard()
    leftovers = [out / ".train_00000.bin.tmp-99999-deadbeef", out / ".index.json.tmp-99999-0badf00d",
                 out / "train_00000.bin.tmp"]  # a killed build's, and an older version's
    for p in leftovers:
        p.write_bytes(b"partial")
    _build(tmp_path, tok_dir)
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]


# --- 3. disk full / unwritable -------------------------------------------------------------------
class _FillingFile:
    """A file object whose disk fills up after `room` bytes (what was written stays, as on a real disk)."""

    def __init__(self, fh, room):
        self.fh, self.room = fh, room

    def write(self, data):
        if len(data) > self.room[0]:
            self.fh.write(data[:self.room[0]])
            self.room[0] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room[0] -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_disk_full_names_the_shard_keeps_finished_ones_and_resumes(tmp_path, tok_dir, monkeypatch):
    whole = _build(tmp_path, tok_dir, name="whole", shard_tokens=1500)
    room = [7000]  # bytes of shard data the disk holds: past the first shards, inside a later one
    real_init = ShardWriter.__init__

    def filling_init(self, *args):
        real_init(self, *args)
        self.fh = _FillingFile(self.fh, room)

    monkeypatch.setattr(ShardWriter, "__init__", filling_init)
    with pytest.raises(StorageError, match=r"disk full while writing \S+/full/train_000\d\d.bin: [\d,]+ bytes free "
                                           r".* finished shards are kept") as info:
        _build(tmp_path, tok_dir, name="full", shard_tokens=1500)
    assert isinstance(info.value, DataError) and info.value.errno == errno.ENOSPC
    monkeypatch.setattr(ShardWriter, "__init__", real_init)
    full = tmp_path / "full"
    finished = json.loads((full / STATE_FILE).read_text())["shards"]["train"]
    assert finished and all((full / s["file"]).stat().st_size == 2 * s["tokens"] for s in finished)
    assert not list(full.glob(".*.tmp-*")) and not (full / INDEX_FILE).exists()
    assert _build(tmp_path, tok_dir, name="full", shard_tokens=1500)["shards"] == whole["shards"]


def test_unwritable_directory_names_the_path_and_the_cause(tmp_path, tok_dir, monkeypatch):
    def no_permission(path, *args, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(tokens_module, "open", no_permission, raising=False)  # every shard file the build opens
    with pytest.raises(StorageError, match=r"cannot write \S+/out/train_00000.bin: permission denied"):
        _build(tmp_path, tok_dir)


def test_disk_full_in_the_text_cache_names_the_file(tmp_path, monkeypatch):
    from psann.lm import psannLMDataPrep

    (tmp_path / "a.txt").write_text(" ".join(STORIES[:5]), encoding="utf-8")
    real_open = open
    monkeypatch.setattr(tokens_module, "open", lambda p, m: _FillingFile(real_open(p, m), [10]), raising=False)
    with pytest.raises(StorageError, match=r"disk full while writing \S+/cache/train_00000.bin"):
        psannLMDataPrep([str(tmp_path / "a.txt")], tokenizer="byte", val_split=0, cache_dir=str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file left


# --- 4. a document that is one line, streamed through the build ----------------------------------
@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 200 bytes and encode chunks of 64 characters: a 6 KB document is 'huge'."""
    monkeypatch.setattr(text_module, "BLOCK_CHARS", 200)
    monkeypatch.setattr(tokens_module, "LONG_DOC_CHARS", 64)
    seen = []
    real = BPETokenizer._encode_text
    monkeypatch.setattr(BPETokenizer, "_encode_text", lambda self, t: seen.append(len(t)) or real(self, t))
    return seen


def test_build_streams_a_single_line_document(tmp_path, tok_dir, bpe, small_blocks):
    line = " ".join(STORIES[:40]).replace("\n", " ")
    (tmp_path / "line.txt").write_text(f"  {line}  ", encoding="utf-8")
    index = _build(tmp_path, tok_dir, inputs=[tmp_path / "line.txt"], separator=None)
    assert index["documents"]["read"] == 1 and len(line) > 30 * 200
    assert max(small_blocks) < 200 and len(small_blocks) > len(line) // 200  # never the whole line at once
    assert _tokens(tmp_path / "out").tolist() == bpe.encode(line, add_bos=True, add_eos=True)


def test_build_with_long_and_short_documents_and_length_filters(tmp_path, tok_dir, bpe, small_blocks):
    docs = [STORIES[0], " ".join(STORIES[1:30]), STORIES[30], " ".join(STORIES[31:40]), STORIES[41]]
    (tmp_path / "in.txt").write_text("\n\n".join(docs), encoding="utf-8")
    limit = len(docs[3]) + 10  # the second long document stays, the first is removed midway
    one = _build(tmp_path, tok_dir, name="one", separator="blank", filters=FilterConfig(max_chars=limit))
    two = _build(tmp_path, tok_dir, name="two", separator="blank", filters=FilterConfig(max_chars=limit), workers=2,
                 batch_docs=1)
    assert one["removed"] == {"max_chars": 1} and one["shards"] == two["shards"]
    kept = [d for d in docs if len(d) <= limit]
    assert _tokens(tmp_path / "one").tolist() == [i for d in kept for i in bpe.encode(d, add_bos=True, add_eos=True)]
    shard = one["shards"]["train"][0]
    assert scan_shard(tmp_path / "one" / shard["file"], np.dtype(np.uint16)) == (shard[SHARD_HASH], shard["max_id"])


def test_data_prep_streams_a_single_line_file(tmp_path, bpe, small_blocks):
    from psann.lm import psannLMDataPrep

    line = " ".join(STORIES[:30]).replace("\n", " ")
    (tmp_path / "line.txt").write_text(line, encoding="utf-8")
    bpe.save(tmp_path / "tok")
    dp = psannLMDataPrep([str(tmp_path / "line.txt")], tokenizer="bpe", tokenizer_model_path=str(tmp_path / "tok"),
                         max_length=32, val_split=0, cache_dir=str(tmp_path / "cache"))
    assert max(small_blocks) < 200
    data = dp.train_windows.data
    assert data.read(0, data.n_tokens).tolist() == bpe.encode(line, add_bos=True, add_eos=True)
