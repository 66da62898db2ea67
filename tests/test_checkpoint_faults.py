"""Checkpoints a user can trust, under injected faults: crafted pickles run no code, corrupt or
missing files are named, a kill at any point of a save leaves the checkpoint loadable, a full or
unwritable disk leaves the previous one intact, and NaN weights are never written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.errors import CheckpointError, PsannError, StorageError
from psann.lm.train import checkpoint as ckpt
from psann.lm.train.resume import latest_checkpoint, load_model_and_optimizer, load_training_state
from psann.lm.train.distributed import DistInfo
from psann.lm.train.optim import build_optimizer
from psann.lm.train.sharded import save_fsdp_checkpoint

TEXT = [f"the {a} cat sat on mat {i}." for i, a in enumerate(["red", "big", "old"] * 20)]
MODEL = dict(base="transformer", d_model=32, n_layers=1, n_heads=2)
FAST = dict(amp="fp32", progress=False, plot=False, eval_interval_steps=0, log_interval_steps=1, device="cpu",
            batch_tokens=64)
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def dp():
    return psannLMDataPrep(TEXT, tokenizer="char", max_length=16, val_split=0.1, seed=0)


@pytest.fixture(scope="module")
def run(dp, tmp_path_factory):
    """A finished run: checkpoints step_0000001..3, final and best."""
    root = tmp_path_factory.mktemp("run")
    psannLM(**MODEL).fit(dp, max_steps=3, checkpoint_dir=str(root), save_interval_steps=1, **FAST)
    return root


def _optimizer(model, config):
    return build_optimizer(model, config.train, torch.device("cpu"), "none")


@pytest.fixture(scope="module")
def sharded(run, tmp_path_factory):
    """step_0000003 in the FSDP layout (dcp/ instead of model.safetensors and optimizer.pt),
    written by save_fsdp_checkpoint in one process."""
    src = run / "checkpoints" / "step_0000003"
    model, tok, config = ckpt.load_checkpoint(src)
    optimizer = _optimizer(model, config)
    load_model_and_optimizer(src, model, optimizer, sharded_model=False)
    state, rng = load_training_state(src)
    dst = tmp_path_factory.mktemp("sharded") / "checkpoints" / "step_0000003"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        save_fsdp_checkpoint(dst, model, optimizer, tok, config, DistInfo(), trainer_state=state, rng_state=rng,
                             consolidated=False, async_save=False)
    return dst


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def copy_ckpt(src: Path, tmp_path: Path, name: str = "step_0000003") -> Path:
    dst = tmp_path / "checkpoints" / name
    shutil.copytree(src, dst)
    return dst


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def resume(directory: Path) -> None:
    """What Trainer._resume reads, without the trainer."""
    config = ckpt.read_checkpoint_config(directory)
    model, _, _ = ckpt.load_checkpoint(directory)
    load_training_state(directory)
    load_model_and_optimizer(directory, model, _optimizer(model, config), sharded_model=False)


def fit_resume(dp, directory: Path, out: Path, max_steps: int = 3) -> psannLM:
    return psannLM(**MODEL).fit(dp, max_steps=max_steps, checkpoint_dir=str(out), resume_from=str(directory), **FAST)


class Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- 1. no code runs ---------------------------------------------------------------------------
EVIL_FILES = ["dcp/.metadata", "optimizer.pt", "rng.pt", "optimizer.pt#zip", "rng.pt#zip", "model.safetensors",
              "config.json", "trainer_state.json", "tokenizer/psann_tokenizer.json", "tokenizer/tokenizer_config.json"]


def plant(path: Path, marker: Path, form: str) -> None:
    """A pickle that runs `touch marker` when loaded: raw, or in torch.save's zip format ("zip")."""
    if form == "zip":
        torch.save({"state": Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Evil(marker)))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("forged", [False, True], ids=["manifest-intact", "manifest-forged"])
def test_no_loader_runs_code_from_any_checkpoint_file(run, sharded, dp, tmp_path, forged):
    marker = tmp_path / "pwned"
    for i, entry in enumerate(EVIL_FILES):
        rel, _, form = entry.partition("#")
        src = sharded if rel.startswith("dcp/") else run / "checkpoints" / "step_0000003"
        case = copy_ckpt(src, tmp_path / str(i))
        plant(case / rel, marker, form)
        if forged:  # an attacker rewrites the manifest too: the loaders' own defences must hold
            ckpt.write_manifest(case)
        loaders = [lambda: psannLM.load(case), lambda: ckpt.load_checkpoint(case),
                   lambda: fit_resume(dp, case, tmp_path / str(i) / "resumed")]
        for n, load in enumerate(loaders):
            try:
                load()
            except PsannError as exc:
                assert Path(rel).name in str(exc), (rel, n, str(exc))
            else:
                assert n < 2 and rel in ("optimizer.pt", "rng.pt", "trainer_state.json"), (rel, n)  # not read
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore")
def test_no_code_runs_from_a_shard_value(sharded, dp, tmp_path):
    """DCP's planner unpickles non-tensor values (optimizer hyperparameters) with weights_only=False."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    marker = tmp_path / "pwned"
    case = copy_ckpt(sharded, tmp_path)
    model, _, config = ckpt.load_checkpoint(case)
    model_sd, optim_sd = get_state_dict(model, _optimizer(model, config))
    optim_sd["param_groups"][0]["lr"] = Evil(marker)
    shutil.rmtree(case / "dcp")
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(case / "dcp"))
    ckpt.write_manifest(case)
    ckpt.load_checkpoint(case)  # the weights alone read no such value
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp holds a value for optimizer\.param_groups"):
        fit_resume(dp, case, tmp_path / "resumed")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore")
def test_sharded_checkpoint_resumes_like_the_safetensors_one(run, sharded, dp, tmp_path):
    manifest = json.loads((sharded / "manifest.json").read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "rng.pt", "trainer_state.json"} <= set(manifest)
    a = fit_resume(dp, sharded, tmp_path / "a", max_steps=4)
    b = fit_resume(dp, run / "checkpoints" / "step_0000003", tmp_path / "b", max_steps=4)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


# -- 2. integrity manifest ---------------------------------------------------------------------
def test_manifest_records_every_file(run):
    final = run / "checkpoints" / "final"
    files = json.loads((final / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"manifest.json", "tokenizer/tokenizer_config.json"}  # the template is editable
    for rel, entry in files.items():
        data = (final / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def flip(path: Path, n: int = 64, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if at is None else at
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_or_missing_files_are_named_with_an_intact_sibling(run, tmp_path):
    root = copy_run(run, tmp_path) / "checkpoints"
    flip(root / "step_0000003" / "model.safetensors", n=1)
    with pytest.raises(CheckpointError, match=r"step_0000003 is corrupt: model\.safetensors has SHA-256 \w+\.\.\., "
                                              r"expected \w+\.\.\. \([\d,]+ bytes\)\. Use another checkpoint of the "
                                              r"run, e\.g\. .*final"):
        psannLM.load(root / "step_0000003")
    (root / "step_0000002" / "tokenizer" / "psann_tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"step_0000002 is incomplete: tokenizer/psann_tokenizer\.json is missing"):
        ckpt.load_checkpoint(root / "step_0000002")
    (root / "step_0000001" / "rng.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"corrupt: rng\.pt has 0 bytes, expected"):
        load_training_state(root / "step_0000001")


def test_checkpoint_without_manifest_loads_unverified(run, tmp_path, caplog):
    final = copy_ckpt(run / "checkpoints" / "final", tmp_path, "final")
    (final / "manifest.json").unlink()
    flip(final / "rng.pt", n=1, at=4000)  # tensor bytes: nothing but a manifest can tell
    caplog.set_level("DEBUG", logger="psann.lm")
    psannLM.load(final)
    load_training_state(final)
    assert "no manifest.json" in caplog.text and "not verified" in caplog.text


def test_latest_checkpoint_skips_broken_ones(run, tmp_path, caplog):
    run_dir = copy_run(run, tmp_path)
    root = run_dir / "checkpoints"
    flip(root / "final" / "optimizer.pt")
    (root / "step_0000003" / "trainer_state.json").write_text('{"step": 3, "tok')
    assert latest_checkpoint(run_dir) == root / "step_0000002"
    assert "skipping checkpoint" in caplog.text
    assert "final: it is corrupt: optimizer.pt" in caplog.text and "step_0000003" in caplog.text


# -- 3. broken state files ---------------------------------------------------------------------
def _truncate(path):
    path.write_bytes(path.read_bytes()[:20])


def _edit_state(**change):
    def edit(path):
        state = json.loads(path.read_text())
        state.update(change)
        path.write_text(json.dumps({k: v for k, v in state.items() if v is not None}))
    return edit


BROKEN = {  # case -> (file, how, pattern the error matches without a manifest)
    "state-truncated": ("trainer_state.json", _truncate, r"trainer_state\.json is not a valid trainer state"),
    "state-no-step": ("trainer_state.json", _edit_state(step=None), r"trainer_state\.json has no 'step'"),
    "state-wrong-type": ("trainer_state.json", _edit_state(step="3"), r"trainer_state\.json: 'step' is '3'"),
    "state-not-object": ("trainer_state.json", lambda p: p.write_text("[3]"), r"trainer_state\.json is not a valid"),
    "rng-garbage": ("rng.pt", lambda p: p.write_bytes(os.urandom(500)), r"cannot read .*rng\.pt"),
    "rng-not-states": ("rng.pt", lambda p: torch.save({"cpu": [1]}, p), r"rng\.pt does not hold RNG states"),
    "rng-flipped": ("rng.pt", flip, None),
    "optimizer-truncated": ("optimizer.pt", _truncate, r"cannot read .*optimizer\.pt"),
    "optimizer-flipped": ("optimizer.pt", flip, None),
    "optimizer-wrong": ("optimizer.pt", lambda p: torch.save({"state": {}, "param_groups": [{"x": 1}]}, p),
                        r"optimizer state in .* does not fit"),
    "dcp-empty": ("dcp", lambda p: [f.unlink() for f in p.iterdir()], r"dcp/\.metadata is missing"),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_state_files_are_named(run, sharded, tmp_path, case):
    rel, how, unverified = BROKEN[case]
    src = sharded if rel == "dcp" else run / "checkpoints" / "step_0000003"
    directory = copy_ckpt(src, tmp_path)
    how(directory / rel)
    with pytest.raises(CheckpointError, match=rf"step_0000003 is (corrupt|incomplete): {rel}"):
        resume(directory)
    if unverified:  # the loaders' own checks, for checkpoints without a manifest
        (directory / "manifest.json").unlink()
        with pytest.raises(CheckpointError, match=unverified):
            resume(directory)


def test_wrong_paths_say_what_they_are(run, tmp_path):
    model = ckpt.load_checkpoint(run / "checkpoints" / "final")[0]
    for load in (psannLM.load, load_training_state, lambda p: ckpt.load_weights(model, p)):
        with pytest.raises(CheckpointError, match="checkpoint not found: .*nope"):
            load(tmp_path / "nope")
        with pytest.raises(CheckpointError, match=r"is a run directory, not a checkpoint; its checkpoints: final, best, "
                                                  r"step_0000003, step_0000002, step_0000001; pass e\.g\. .*checkpoints/final"):
            load(run)


# -- 4. a kill at any point of a save ------------------------------------------------------------
SAVER = """
import sys, torch
from psann.lm.train import checkpoint as ckpt
from psann.lm.train.resume import load_training_state
model, tok, config = ckpt.load_checkpoint(sys.argv[1])
state, rng = load_training_state(sys.argv[1])
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
ckpt.save_checkpoint(sys.argv[1], model, tok, config, trainer_state=state, rng_state=rng, optimizer_state={})
"""


def test_a_kill_at_any_point_of_a_save_leaves_the_checkpoint_loadable(run, tmp_path):
    source = run / "checkpoints" / "final"
    old = load_file(source / "model.safetensors")
    procs = {}
    for point in ckpt.FAULT_POINTS:  # all at once: each is mostly interpreter start-up
        final = copy_ckpt(source, tmp_path / point, "final")
        env = {**os.environ, "PSANN_FAULT_POINT": point, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
        procs[point] = subprocess.Popen([sys.executable, "-c", SAVER, str(final)], env=env, stderr=subprocess.PIPE)
    for point in ckpt.FAULT_POINTS:
        assert procs[point].wait(timeout=120) == 137, procs[point].stderr.read().decode()[-2000:]
        procs[point].stderr.close()
        root = tmp_path / point / "checkpoints"
        final = root / "final"
        if point == "old-aside":  # no final: loaders read the previous version until it is put back
            assert not final.exists()
            ckpt.load_checkpoint(final)
        ckpt.recover_checkpoints(root)
        assert leftovers(root) == [], point
        model, _, _ = ckpt.load_checkpoint(final)
        load_training_state(final)
        published = ckpt.FAULT_POINTS.index(point) >= ckpt.FAULT_POINTS.index("new-in")
        for k, v in model.state_dict().items():
            if k in old:
                assert torch.equal(v, old[k] + 1 if published else old[k]), (point, k)


def test_recover_removes_leftovers_and_restores_a_missing_checkpoint(run, tmp_path):
    root = copy_run(run, tmp_path) / "checkpoints"
    partial = root / ".final.old-1-aaaa"  # a removal of the replaced checkpoint, killed midway
    shutil.copytree(root / "final", partial)
    (partial / "model.safetensors").unlink()
    (root / ".step_0000004.tmp-sharded").mkdir()  # a killed FSDP save's staging directory
    (root / ".step_0000004.tmp-sharded" / "dcp").mkdir()
    os.replace(root / "step_0000002", root / ".step_0000002.old-2-bbbb")  # killed between the two renames
    ckpt.recover_checkpoints(root)
    assert leftovers(root) == []
    assert sorted(p.name for p in root.iterdir()) == ["best", "final", "step_0000001", "step_0000002", "step_0000003"]
    ckpt.verify_checkpoint(root / "step_0000002")


# -- 5. disk full, no permission -----------------------------------------------------------------
@pytest.mark.parametrize("where", ["optimizer.pt", "model.safetensors"])
def test_disk_full_keeps_the_previous_checkpoint(run, tmp_path, monkeypatch, where):
    final = copy_ckpt(run / "checkpoints" / "final", tmp_path, "final")
    before = load_file(final / "model.safetensors")
    model, tok, config = ckpt.load_checkpoint(final)
    if where == "optimizer.pt":
        def full(obj, fh, *args, **kwargs):
            fh.write(b"\0" * 100)  # a partial write, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(torch, "save", full)
    else:
        def full(model, filename, *args, **kwargs):  # what safetensors raises, with no errno
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at "
                                  f"path \"{filename}\"")
        monkeypatch.setattr(ckpt, "save_model", full)
    with pytest.raises(StorageError, match=rf"disk full while writing .*{where}: [\d,]+ bytes free"):
        ckpt.save_checkpoint(final, model, tok, config, optimizer_state={"x": torch.zeros(2)})
    assert leftovers(final.parent) == []
    after = load_file(final / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    ckpt.verify_checkpoint(final)


def test_unwritable_directory_is_named(run, tmp_path, monkeypatch):
    model, tok, config = ckpt.load_checkpoint(run / "checkpoints" / "final")
    parent = tmp_path / "readonly"
    parent.mkdir()
    if os.geteuid() == 0:  # root writes through chmod: fail the mkdir as a read-only directory would
        real_mkdir = Path.mkdir

        def denied(self, *args, **kwargs):
            if self.parent == parent:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)
        monkeypatch.setattr(Path, "mkdir", denied)
    else:
        parent.chmod(0o555)
    try:
        with pytest.raises(StorageError, match=r"cannot write .*readonly.*: permission denied"):
            ckpt.save_checkpoint(parent / "final", model, tok, config)
    finally:
        parent.chmod(0o755)
    assert list(parent.iterdir()) == []


# -- 6. file modes, 7. non-finite weights ------------------------------------------------------
def test_every_file_gets_the_mode_of_a_new_file(run, tmp_path):
    src = run / "checkpoints" / "final"
    model, tok, config = ckpt.load_checkpoint(src)
    state, rng = load_training_state(src)
    umask = os.umask(0o027)
    try:
        ckpt.save_checkpoint(tmp_path / "c", model, tok, config, trainer_state=state, rng_state=rng,
                             optimizer_state={"x": torch.zeros(2)})
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "c").rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


@pytest.mark.filterwarnings("ignore")
def test_non_finite_weights_are_never_saved(run, tmp_path):
    model, tok, config = ckpt.load_checkpoint(run / "checkpoints" / "final")
    name, param = list(model.named_parameters())[3]
    with torch.no_grad():
        param.view(-1)[1] = float("nan")
    with pytest.raises(CheckpointError, match=rf"weight '{name}' holds NaN or inf .* learning rate"):
        ckpt.save_checkpoint(tmp_path / "c", model, tok, config)
    with pytest.raises(CheckpointError, match=rf"weight '{name}' holds NaN"):
        save_fsdp_checkpoint(tmp_path / "d", model, _optimizer(model, config), tok, config, DistInfo(),
                             trainer_state=None, rng_state=None, consolidated=False, async_save=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore")
def test_disk_full_while_writing_shards_leaves_no_staging_directory(run, tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as dcp_fs

    model, tok, config = ckpt.load_checkpoint(run / "checkpoints" / "final")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(dcp_fs, "_write_item", full)
    with pytest.raises(StorageError, match=r"disk full while writing .*step_0000004\.tmp-sharded/dcp"):
        save_fsdp_checkpoint(tmp_path / "checkpoints" / "step_0000004", model, _optimizer(model, config), tok, config,
                             DistInfo(), trainer_state=None, rng_state=None, consolidated=False, async_save=False)
    assert list((tmp_path / "checkpoints").iterdir()) == []
