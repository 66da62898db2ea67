"""Profiling helpers: NVTX toggled by PSANN_NVTX, CUDA memory helpers that do nothing on CPU, saved-tensor bytes."""

import contextlib
from pathlib import Path

import pytest
import torch

from psann.lm import profiling
from psann.lm.profiling import (SavedTensorBytes, dump_memory_snapshot, memory_summary, nvtx_enabled, nvtx_range,
                                start_memory_history, stop_memory_history)


@pytest.fixture
def fake_cuda_nvtx(monkeypatch):
    """Pretend CUDA is present and record the NVTX ranges opened."""
    opened = []

    def fake_range(name):
        opened.append(name)
        return contextlib.nullcontext()

    monkeypatch.setattr(profiling, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range", fake_range)
    return opened


def test_nvtx_ranges_follow_the_environment_variable(monkeypatch, fake_cuda_nvtx):
    monkeypatch.delenv("PSANN_NVTX", raising=False)
    with nvtx_range("off"):
        pass
    monkeypatch.setenv("PSANN_NVTX", "0")
    with nvtx_range("still off"):
        pass
    assert fake_cuda_nvtx == [] and not nvtx_enabled()
    monkeypatch.setenv("PSANN_NVTX", "1")
    with nvtx_range("forward"):
        pass
    assert fake_cuda_nvtx == ["forward"] and nvtx_enabled()


def test_nvtx_levels_and_the_diffusionlm_variables(monkeypatch, fake_cuda_nvtx):
    for name in ("PSANN_NVTX", "PSANN_NVTX_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRANSFORMERLM_NVTX", "1")
    monkeypatch.setenv("TRANSFORMERLM_NVTX_LEVEL", "coarse")
    for name, level in (("step", "coarse"), ("forward", "fine"), ("batches", "verbose")):
        with nvtx_range(name, level):
            pass
    assert fake_cuda_nvtx == ["step"]
    monkeypatch.setenv("TRANSFORMERLM_NVTX_LEVEL", "verbose")
    with nvtx_range("batches", "verbose"):
        pass
    assert fake_cuda_nvtx == ["step", "batches"]
    monkeypatch.setenv("PSANN_NVTX_LEVEL", "loud")  # psann's name wins over the earlier one
    with pytest.raises(ValueError, match="PSANN_NVTX_LEVEL='loud': choose one of coarse, fine, verbose"):
        nvtx_range("x")


def test_nvtx_is_a_shared_no_op_without_cuda(monkeypatch):
    monkeypatch.setattr(profiling, "_cuda_available", lambda: False)
    monkeypatch.setenv("PSANN_NVTX", "1")
    assert not nvtx_enabled()
    first, second = nvtx_range("a"), nvtx_range("b")
    assert first is second  # nothing is built per call
    with first:
        pass


def test_cuda_memory_helpers_are_no_ops_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(profiling, "_cuda_available", lambda: False)
    assert start_memory_history() is None
    assert dump_memory_snapshot(tmp_path / "snap.pickle") is None
    assert not (tmp_path / "snap.pickle").exists()
    assert memory_summary() == {}
    assert profiling.peaks() == {}
    profiling.reset_peaks()
    stop_memory_history()


def test_memory_snapshot_from_env_records_a_block_and_dumps_even_on_failure(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(profiling, "start_memory_history", lambda: calls.append("start") or True)
    monkeypatch.setattr(profiling, "dump_memory_snapshot", lambda path: calls.append(Path(path).name))
    monkeypatch.setattr(profiling, "stop_memory_history", lambda: calls.append("stop"))
    monkeypatch.delenv(profiling.MEMORY_SNAPSHOT_ENV, raising=False)
    with profiling.memory_snapshot_from_env():
        pass
    assert calls == []  # off without the variable
    monkeypatch.setenv(profiling.MEMORY_SNAPSHOT_ENV, str(tmp_path / "run.pickle"))
    with pytest.raises(RuntimeError), profiling.memory_snapshot_from_env(rank=2):
        raise RuntimeError("out of memory")
    assert calls == ["start", "run.rank2.pickle", "stop"]


def test_memory_snapshot_from_env_is_a_no_op_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(profiling, "_cuda_available", lambda: False)
    monkeypatch.setenv(profiling.MEMORY_SNAPSHOT_ENV, str(tmp_path / "run.pickle"))
    with profiling.memory_snapshot_from_env():
        pass
    assert list(tmp_path.iterdir()) == []


def test_memory_summary_is_empty_for_a_cpu_device_even_with_cuda(monkeypatch):
    monkeypatch.setattr(profiling, "_cuda_available", lambda: True)
    assert memory_summary("cpu") == {}


def test_saved_tensor_bytes_counts_activations_not_parameters():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)  # so linear keeps its weight too, for x's gradient
    with SavedTensorBytes(lin) as saved:
        y = torch.relu(lin(x))
    # linear keeps its input and its weight (a parameter: not counted), relu its output: 2 x 4 x 8 fp32
    assert saved.bytes == 2 * 4 * 8 * 4
    y.sum().backward()  # the hooks leave backward untouched
    assert lin.weight.grad is not None
    with torch.no_grad(), SavedTensorBytes(lin) as nothing:
        lin(x)
    assert nothing.bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_snapshot_and_summary(tmp_path):
    assert start_memory_history() is True
    x = torch.randn(1024, 1024, device="cuda")
    path = dump_memory_snapshot(tmp_path / "snap.pickle")
    stop_memory_history()
    assert path.exists() and path.stat().st_size > 0
    summary = memory_summary()
    assert summary["allocated_gb"] >= x.numel() * 4 / 2**30 and summary["max_allocated_gb"] >= summary["allocated_gb"]
