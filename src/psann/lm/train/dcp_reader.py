"""Reading torch.distributed.checkpoint shards without running any code they hold.

DCP's own reader unpickles dcp/.metadata with pickle.load and its planner loads non-tensor values
with torch.load(weights_only=False): a crafted checkpoint would run code on load. SafeReader admits
only the classes DCP metadata is made of, and SafeLoadPlanner loads values with weights_only=True.

A module of its own because importing torch.distributed.checkpoint costs about a second and 45 MB:
only sharded checkpoints pay for it.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ..errors import CheckpointError, PsannError

# Everything a DCP .metadata pickle refers to (listed from FSDP and single-process saves of
# torch 2.13), besides torch dtypes. None of them runs code when unpickled.
_METADATA_GLOBALS = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
    "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path} refers to {module}.{name}, which DCP metadata never holds; refusing to "
                              "load it (the file is corrupt or was made to run code). Use another checkpoint.")


def _read_metadata(path: Path):
    try:
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh, path).load()
    except PsannError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the sharded checkpoint is incomplete. Use another checkpoint "
                              "of the run.") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not valid DCP metadata ({type(exc).__name__}: {str(exc)[:200]}); it is "
                              "corrupt or truncated. Use another checkpoint of the run.") from None
    infos = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, Metadata) or not isinstance(infos, dict) or not all(
            isinstance(getattr(i, "relative_path", None), str) and Path(i.relative_path).name == i.relative_path
            for i in infos.values()):  # shards are files next to .metadata, never elsewhere
        raise CheckpointError(f"{path} is not valid DCP metadata; it is corrupt. Use another checkpoint of the run.")
    metadata.storage_meta = metadata.storage_meta or StorageMeta()
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is unpickled with only DCP's metadata classes admitted."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.metadata = _read_metadata(Path(path) / ".metadata")  # raises here, outside DCP's error handling

    def read_metadata(self, *args, **kwargs):
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except PsannError:
            raise
        except Exception as exc:
            files = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
            raise CheckpointError(f"cannot read {Path(self.path) / files[0] if len(files) == 1 else self.path}: "
                                  f"{type(exc).__name__}: {str(exc)[:200]}. It is corrupt or truncated; use another "
                                  "checkpoint of the run.") from exc


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner loading non-tensor values (optimizer hyperparameters) with weights_only=True."""

    def __init__(self, reader: SafeReader):
        super().__init__()
        self.reader = reader

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exc:
            where = Path(self.reader.path) / self.reader.storage_data[read_item.storage_index].relative_path
            raise CheckpointError(f"{where} holds a value for {read_item.dest_index.fqn} that is not plain data; "
                                  f"refusing to load it ({str(exc).splitlines()[-1][:200]}). Use another "
                                  "checkpoint.") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _cause(exc: BaseException) -> PsannError | None:
    """Our own error inside DCP's CheckpointException (which gathers every rank's failures)."""
    if isinstance(exc, PsannError):
        return exc
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, PsannError):
            return inner
    return None


def load_shards(state: dict, path: Path) -> None:
    """dcp.load into `state` from the shard directory `path`, through SafeReader."""
    reader = SafeReader(path)
    try:
        with warnings.catch_warnings():  # one process reading shards is intended, not a mistake
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(reader))
    except (Exception, CheckpointException) as exc:  # CheckpointException derives from BaseException
        raise _cause(exc) or CheckpointError(
            f"cannot read the sharded checkpoint {path}: {str(exc)[:300]}. It is incomplete or was written for "
            "another model; use another checkpoint.") from exc
