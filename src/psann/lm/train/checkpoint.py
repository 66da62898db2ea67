"""Checkpoint directories: weights (safetensors), config (JSON), tokenizer, training state, and a
manifest that every load checks them against.

Layout of a checkpoint directory:
    model.safetensors     weights (tied tensors stored once); FSDP step checkpoints have dcp/ instead
    config.json           format version + the resolved run config
    tokenizer/            the tokenizer's own files
    trainer_state.json    step, tokens seen, loader position, loss scaler, best val loss  (training)
    optimizer.pt          optimizer state keyed by parameter name (single process and DDP)
    dcp/                  FSDP: model and optimizer shards (torch.distributed.checkpoint)
    rng.pt                every rank's RNG states                                           (training)
    manifest.json         size and SHA-256 of every other file, written last

Writing: weights holding NaN or inf are refused. The files go to a temporary sibling
`.NAME.tmp-*`, get the mode of any new file, are recorded in manifest.json and fsynced, and the
directory is then renamed into place (an existing NAME is first renamed to `.NAME.old-*`). A kill
at any instant leaves a complete checkpoint under NAME or `.NAME.old-*`: loaders read the latter
while NAME is missing, and `recover_checkpoints` (run by the trainer at start, holding the run's
lock) puts it back and removes the leftovers.

Loading: each loader first checks the files it reads against manifest.json (a checkpoint without
one, from an older psann-lm, loads unchecked); read_checkpoint_config reads config.json unchecked,
to stay cheap for reports. Only tensors and plain data are read: safetensors for weights,
`torch.load(weights_only=True)` for optimizer and RNG state, and DCP through a reader that admits
only its own metadata classes (sharded.py), so no code in a checkpoint ever runs. Optimizer state
is keyed by parameter name (torch.distributed.checkpoint.state_dict), so either form resumes under
another world size or parallelism; resume.py reads the training state back.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from psann import __version__

from ..config import RunConfig
from ..errors import CheckpointError, ConfigError
from ..models import build_model
from ..files import fsync_dir, fsync_tree, raise_os_error, read_json, temp_name
from ..tokenizers import load_tokenizer

log = logging.getLogger("psann.lm")

FORMAT = "psann-lm-checkpoint"
FORMAT_VERSION = 1
# Config keys added since format v1 was first written, with the value older checkpoints (which lack
# the key) meant, where today's default differs.
LEGACY_DEFAULTS = {"model": {"qk_norm": False}}
WEIGHTS, CONFIG, TOKENIZER, STATE, OPTIMIZER = "model.safetensors", "config.json", "tokenizer", "trainer_state.json", "optimizer.pt"
SHARDED, RNG, MANIFEST = "dcp", "rng.pt", "manifest.json"
RUN_MARKERS = ("checkpoints", "config.yaml", "metrics.jsonl")  # what a run directory holds
UNHASHED = ("tokenizer/tokenizer_config.json",)  # the chat template, which users may edit (README)
# Where a save can be killed, in order; PSANN_FAULT_POINT=<name> makes the process exit there.
FAULT_POINTS = ("weights-written", "files-written", "sealed", "synced", "old-aside", "new-in", "published")

_verified: set[tuple] = set()  # files hashed by this process (path, size, mtime, inode, digest): a resume hashes each once


def _fault_point(name: str) -> None:
    """A kill, for the crash tests: exits at once, as SIGKILL would (no cleanup, no flush)."""
    if os.environ.get("PSANN_FAULT_POINT") == name:
        os._exit(137)


# -- writing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def writing(path: Path):
    """OS errors name `path` and the cause (disk full: how much is free; permission)."""
    try:
        yield
    except OSError as exc:
        raise_os_error(exc, path, "writing")


def _write_json(path: Path, data: Any) -> None:
    with writing(path):
        path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_torch(obj: Any, path: Path) -> None:
    # Through a Python file object: torch.save(obj, path) reports a full disk with no path or errno.
    with writing(path), open(path, "wb") as fh:
        torch.save(obj, fh)


def _save_weights(model: nn.Module, path: Path) -> None:
    with writing(path):
        try:
            save_model(model, str(path))
        except Exception as exc:  # safetensors' writer reports OS errors as text: "... (os error 28) ..."
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    for name, tensor in tensors:
        # NaN and inf make any sum non-finite, so a finite sum clears a tensor ~25x faster than
        # isfinite().all(); a non-finite sum may be an overflow, which the exact check rules out.
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def non_finite_error(name: str, directory: Path) -> CheckpointError:
    return CheckpointError(f"refusing to save {directory}: weight '{name}' holds NaN or inf (training diverged). "
                           "Lower the learning rate (train.lr) or raise train.warmup_steps, then resume from the "
                           "last checkpoint, which is intact.")


def save_checkpoint(directory: str | os.PathLike, model: nn.Module | None, tokenizer, config: RunConfig, *,
                    trainer_state: dict | None = None, optimizer_state: dict | None = None,
                    rng_state: dict | None = None, staged: Path | None = None) -> Path:
    """Write a checkpoint atomically; an existing directory of the same name is replaced.

    `model` None writes no weights file (a sharded checkpoint whose shards were already written
    into `staged`, the temporary directory that is then completed and renamed). On any error
    the temporary directory is removed and the previous checkpoint is left as it was."""
    directory = Path(directory)
    if model is not None and (bad := first_non_finite(model.state_dict().items())):
        raise non_finite_error(bad, directory)
    tmp = staged or temp_name(directory)
    with published_as(directory, tmp):
        with writing(tmp):
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir(exist_ok=staged is not None)
        if model is not None:
            _save_weights(model, tmp / WEIGHTS)
        _fault_point("weights-written")
        _write_json(tmp / CONFIG, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                   "psann_version": __version__, "config": config.to_dict()})
        with writing(tmp / TOKENIZER):
            tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            _write_json(tmp / STATE, trainer_state)
        if optimizer_state is not None:
            save_torch(optimizer_state, tmp / OPTIMIZER)
        if rng_state is not None:
            save_torch(rng_state, tmp / RNG)
        _fault_point("files-written")
    return directory


def _new_file_mode(directory: Path) -> int:
    """0o666 less the umask, read off a new file (os.umask() would change it for every thread)."""
    probe = temp_name(directory / "mode")
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)


def _sha256(path: Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike) -> None:
    """Record the size and SHA-256 of every file under `directory` in its manifest.json."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(directory).as_posix()
        if rel not in UNHASHED:
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    _write_json(directory / MANIFEST, {"format": "psann-lm-manifest", "files": files})


def _seal(tmp: Path) -> None:
    """Same mode for every file (safetensors writes 0600), the manifest last, then all of it durable."""
    with writing(tmp):
        mode = _new_file_mode(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                os.chmod(path, mode)
    write_manifest(tmp)
    _fault_point("sealed")
    with writing(tmp):
        fsync_tree(tmp)
    _fault_point("synced")


def publish(tmp: Path, directory: Path) -> None:
    """Rename `tmp` to `directory`. Replacing takes two renames (old aside, new in); a kill between
    them leaves the old checkpoint under `.NAME.old-*`, which recover_checkpoints moves back."""
    old = None
    with writing(directory):
        if directory.exists():
            old = temp_name(directory, "old")
            os.replace(directory, old)
            _fault_point("old-aside")
        try:
            os.replace(tmp, directory)
        except BaseException:
            if old is not None:
                os.replace(old, directory)
            raise
    _fault_point("new-in")
    fsync_dir(directory.parent)
    _fault_point("published")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # a kill midway leaves a leftover for recover_checkpoints


@contextlib.contextmanager
def published_as(directory: Path, tmp: Path):
    """What the block writes into `tmp` is sealed and renamed to `directory`; on any error `tmp`
    is removed and the previous `directory` is left as it was."""
    try:
        yield
        _seal(tmp)
        publish(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def staging_dir(directory: str | os.PathLike) -> Path:
    """The fixed temporary name all ranks of a job write a sharded checkpoint into before it is
    renamed; a killed job's leftover is removed by recover_checkpoints or the next save."""
    directory = Path(directory)
    return directory.with_name(f".{directory.name}.tmp-sharded")


# -- recovery --------------------------------------------------------------------------------
def _leftovers(directory: Path, tag: str) -> list[Path]:
    """`.NAME.<tag>-*` siblings of `directory`, sorted by name."""
    parent = directory.parent
    return sorted(parent.glob(f".{glob.escape(directory.name)}.{tag}-*")) if parent.is_dir() else []


def _restorable(directory: Path) -> Path | None:
    """The intact `.NAME.old-*` an interrupted save left for the missing `directory`, if any."""
    return next((old for old in _leftovers(directory, "old") if mismatch(old, require=(CONFIG,)) is None), None)


def recover_checkpoints(root: str | os.PathLike) -> None:
    """Repair what killed saves left under `root` (run_dir/checkpoints): a `.NAME.old-*` whose NAME
    is gone is moved back (an intact one); one whose NAME is there is removed; `.NAME.tmp-*`
    directories (unfinished saves, sharded staging included) are removed. Only while no save can
    run there: the trainer calls it at start, holding the run directory's lock."""
    root = Path(root)
    if not root.is_dir():
        return
    for tmp in sorted(root.glob(".*.tmp-*")):
        log.info("removing %s, left by an interrupted save", tmp)
        _remove(tmp)
    for old in sorted(root.glob(".*.old-*")):
        name = root / old.name[1:].rsplit(".old-", 1)[0]
        if not name.exists() and _restorable(name) == old:
            os.replace(old, name)
            log.warning("restored %s from %s: its save was interrupted before the new version was in place", name, old.name)
        else:
            log.info("removing %s, left by an interrupted save", old)
            _remove(old)
    fsync_dir(root)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- verification ----------------------------------------------------------------------------
def _read_manifest(directory: Path) -> dict[str, dict] | None:
    """{relative path: {"size", "sha256"}}, or None for a checkpoint written before manifests."""
    path = directory / MANIFEST
    if not path.exists():
        log.debug("%s has no %s (written by an older psann-lm): its files are not verified", directory, MANIFEST)
        return None
    data = read_json(path, CheckpointError, "checkpoint manifest")
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(_valid_entry(rel, entry) for rel, entry in files.items()):
        raise CheckpointError(f"{path} is not a valid checkpoint manifest")
    return files


def _valid_entry(rel: str, entry: Any) -> bool:
    inside = not Path(rel).is_absolute() and ".." not in Path(rel).parts  # never a file outside the checkpoint
    return inside and isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)


def mismatch(directory: Path, names: Iterable[str] = (), require: Iterable[str] = ()) -> str | None:
    """Why the files under `names` (all when empty) do not match the manifest, or None when they
    do; `require` names files that must exist whatever the manifest says."""
    if missing := [n for n in require if not (directory / n).exists()]:
        return f"incomplete: missing {', '.join(missing)}"
    try:
        manifest = _read_manifest(directory)
    except CheckpointError:
        return f"corrupt: its {MANIFEST} is not valid JSON or not a manifest"
    names = tuple(names)
    for rel, want in (manifest or {}).items():
        if names and not any(rel == n or rel.startswith(n + "/") for n in names):
            continue
        path = directory / rel
        try:
            info = path.stat()
        except FileNotFoundError:
            return f"incomplete: {rel} is missing (its {MANIFEST} lists it)"
        if info.st_size != want["size"]:
            return f"corrupt: {rel} has {info.st_size:,} bytes, expected {want['size']:,}"
        key = (str(path.resolve()), info.st_size, info.st_mtime_ns, info.st_ino, want["sha256"])
        if key not in _verified:
            if (digest := _sha256(path)) != want["sha256"]:
                return (f"corrupt: {rel} has SHA-256 {digest[:16]}..., expected {want['sha256'][:16]}... "
                        f"({info.st_size:,} bytes)")
            _verified.add(key)
    return None


def verify_checkpoint(directory: str | os.PathLike, *names: str) -> None:
    """Check the files under `names` (every file when none) against the checkpoint's manifest:
    CheckpointError naming the first that is missing or differs, and an intact sibling to use."""
    directory = Path(directory)
    if (problem := mismatch(directory, names)) is not None:
        raise CheckpointError(f"checkpoint {directory} is {problem}. {_other_checkpoint(directory)}")


def _other_checkpoint(directory: Path) -> str:
    """Advice naming the newest intact sibling checkpoint (by trainer step; weights-only last)."""
    def step(path: Path) -> int:
        try:
            return int(json.loads((path / STATE).read_text(encoding="utf-8"))["step"])
        except Exception:
            return -1

    siblings = [p for p in directory.parent.iterdir() if p != directory and not p.name.startswith(".")
                and (p / CONFIG).exists()] if directory.parent.is_dir() else []
    for sibling in sorted(siblings, key=lambda p: (step(p), p.name), reverse=True):
        if mismatch(sibling) is None:
            return f"Use another checkpoint of the run, e.g. {sibling}."
    return ("No intact checkpoint is next to it. If you changed a file on purpose, delete its manifest.json to "
            "load it unverified.")


# -- loading ---------------------------------------------------------------------------------
def resolve_checkpoint(directory: str | os.PathLike) -> Path:
    """`directory`, or the previous version an interrupted save left while it is missing; a
    CheckpointError saying what the path is when it is not a checkpoint."""
    directory = Path(directory)
    if not directory.exists():
        old = _restorable(directory)
        if old is None:
            raise CheckpointError(f"checkpoint not found: {directory}. Pass the directory written by training "
                                  "(e.g. runs/<name>/checkpoints/final).")
        log.warning("%s is missing: its save was interrupted. Reading its previous version %s (the next "
                    "training run in this directory puts it back).", directory, old.name)
        return old
    if not directory.is_dir():
        raise CheckpointError(f"a checkpoint is a directory (model.safetensors, config.json, tokenizer/); {directory} is a file.")
    if not (directory / CONFIG).exists() and any((directory / m).exists() for m in RUN_MARKERS):
        raise CheckpointError(_run_dir_message(directory))
    return directory


def _run_dir_message(run: Path) -> str:
    root = run / "checkpoints"
    names = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    names = [n for n in ("final", "best") if n in names] + sorted(set(names) - {"final", "best"}, reverse=True)
    if not names:
        return f"{run} is a run directory, not a checkpoint, and it holds no checkpoints yet."
    return (f"{run} is a run directory, not a checkpoint; its checkpoints: {', '.join(names)}; pass e.g. "
            f"{root / names[0]} (or train.resume_from=latest with train.checkpoint_dir={run}).")


def read_checkpoint_config(directory: str | os.PathLike) -> RunConfig:
    """The run config a checkpoint was written with (config.json is read unverified: cheap)."""
    directory = resolve_checkpoint(directory)
    missing = [n for n in (CONFIG, TOKENIZER) if not (directory / n).exists()]
    if not (directory / WEIGHTS).exists() and not (directory / SHARDED).is_dir():
        missing.insert(0, WEIGHTS)
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {', '.join(missing)}. "
                              "It may have been interrupted while copying; use another checkpoint of the run.")
    meta = read_json(directory / CONFIG, CheckpointError, "checkpoint config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory} was not written by psann-lm (config.json has no '{FORMAT}' marker).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory} uses checkpoint format v{meta.get('format_version')} "
                              f"(psann-lm {meta.get('psann_version')}); this psann-lm reads v{FORMAT_VERSION}. "
                              "Install the psann-lm version that wrote it.")
    stored = meta.get("config")
    for section, keys in LEGACY_DEFAULTS.items():
        if isinstance(stored, dict) and isinstance(stored.get(section), dict):
            stored[section] = {**keys, **stored[section]}
    try:
        return RunConfig.from_dict(stored)
    except (ConfigError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{directory}: its config no longer validates ({exc}); it was written by an "
                              "incompatible psann-lm version.") from exc


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """-> (model, tokenizer, run_config). The model is built from the stored config, then filled."""
    directory = resolve_checkpoint(directory)
    config = read_checkpoint_config(directory)
    verify_checkpoint(directory, CONFIG, TOKENIZER)
    model = build_model(config.model)
    load_weights(model, directory)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{config.model.vocab_size}; the tokenizer directory does not belong to these weights.")
    return model.to(device), tokenizer, config


def load_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Fill `model` (one process, unsharded) from a checkpoint's safetensors or its DCP shards."""
    directory = resolve_checkpoint(directory)
    path = directory / WEIGHTS
    if not path.exists() and (directory / SHARDED).is_dir():
        # lazy: torch.distributed.checkpoint takes ~1 s to import; only sharded checkpoints need it
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        verify_checkpoint(directory, SHARDED)
        state = {"model": get_model_state_dict(model)}
        dcp_load(state, directory)
        set_model_state_dict(model, state["model"])
        return
    if not path.exists():
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {WEIGHTS}. Use another checkpoint of the run.")
    verify_checkpoint(directory, WEIGHTS)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"cannot read weights {path}: {exc}. The file is corrupt or truncated; "
                              "use another checkpoint.") from exc
    if missing or unexpected:
        raise CheckpointError(f"weights in {path} do not fit the model built from its config "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}).")


def dcp_load(state: dict, directory: Path) -> None:
    from .dcp_reader import load_shards  # lazy: torch.distributed.checkpoint takes ~1 s; only sharded checkpoints need it

    load_shards(state, directory / SHARDED)


def load_torch(path: Path) -> Any:
    """Tensors and plain data only: a pickle that would build anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        reason = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0])
        raise CheckpointError(f"cannot read {path}: {reason[:300].rstrip('.')}. It is corrupt, truncated or holds more than "
                              "tensors (only tensors and plain values are read); use another checkpoint.") from exc
