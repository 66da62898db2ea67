"""Metric backends: what each one writes, rank-zero behaviour, config errors, and a real run through all of them."""

import csv
import json
import struct
import sys
import time

import pytest

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.config import TrainConfig, load_config
from psann.lm.errors import ConfigError
from psann.lm.config import LOGGERS
from psann.lm.train.loggers import CsvLogger, TensorBoardLogger, open_loggers

TRAIN = {"kind": "train", "step": 10, "epoch": 0.5, "tokens": 1280, "loss": 2.5, "lr": 3e-4, "mfu": None,
         "tok_per_s": 12345.6}
VAL = {"kind": "val", "step": 10, "tokens": 1280, "val_loss": 2.75, "val_ppl": 15.6, "val_nelbo_se": 0.01}


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def scalars(accumulator, tag):
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_csv_grows_a_column_per_new_key_and_a_resumed_run_appends(tmp_path):
    logger = CsvLogger(tmp_path)
    logger.log({"kind": "train", "step": 1, "loss": 3.0})
    logger.log({"kind": "val", "step": 1, "val_loss": 3.5})
    logger.log({"kind": "train", "step": 2, "loss": 2.0, "stage0_ratio_loss": 1.1})
    logger.close()
    fields, rows = read_csv(tmp_path / "metrics.csv")
    assert fields == ["kind", "step", "loss", "val_loss", "stage0_ratio_loss"]
    assert [(r["kind"], r["step"], r["loss"], r["val_loss"], r["stage0_ratio_loss"]) for r in rows] == [
        ("train", "1", "3.0", "", ""), ("val", "1", "", "3.5", ""), ("train", "2", "2.0", "", "1.1")]

    resumed = CsvLogger(tmp_path)  # a resumed run reads the header back and appends under it
    resumed.log({"kind": "train", "step": 3, "stage0_ratio_loss": 1.0, "loss": 1.5})
    resumed.log({"kind": "val", "step": 3, "val_loss": 2.5, "val_nelbo_se": 0.02})
    fields, rows = read_csv(tmp_path / "metrics.csv")
    assert fields == ["kind", "step", "loss", "val_loss", "stage0_ratio_loss", "val_nelbo_se"]
    assert [r["step"] for r in rows] == ["1", "1", "2", "3", "3"]
    assert rows[3]["loss"] == "1.5" and rows[3]["stage0_ratio_loss"] == "1.0" and rows[4]["val_nelbo_se"] == "0.02"
    assert rows[0]["loss"] == "3.0" and rows[0]["val_nelbo_se"] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary file left behind


def test_console_and_jsonl(tmp_path, capsys):
    loggers = open_loggers(["console", "jsonl"], tmp_path)
    loggers.log(TRAIN)
    loggers.log(VAL)
    loggers.log({**TRAIN, "mfu": 0.4321})
    loggers.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [TRAIN, VAL, {**TRAIN, "mfu": 0.4321}]
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["train step 10: loss 2.5, lr 0.0003, tok_per_s 12,346",
                     "val step 10: val_loss 2.75, val_ppl 15.6, val_nelbo_se 0.01",
                     "train step 10: loss 2.5, lr 0.0003, mfu 43.2%, tok_per_s 12,346"]


def test_tensorboard_writes_scalars_by_kind_and_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    logger.log(TRAIN)
    logger.log({**TRAIN, "step": 20, "loss": 2.0, "note": "text is skipped"})
    logger.log(VAL)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tok_per_s", "val/val_loss", "val/val_nelbo_se"} <= tags
    assert not {"train/mfu", "train/note", "train/kind", "train/step"} & tags
    assert scalars(acc, "train/loss") == [(10, 2.5), (20, 2.0)]
    assert scalars(acc, "val/val_loss") == [(10, 2.75)]


def wandb_records(path):
    """(kind, record) pairs of an offline run's .wandb file: after a 7-byte header, records of
    crc32 (4 bytes), length (2), type (1) and a protobuf Record; a small file holds only whole ones."""
    from wandb.proto import wandb_internal_pb2

    data, pos, records = path.read_bytes(), 7, []
    while pos + 7 <= len(data):
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # block padding
            break
        assert kind == 1, "a record split across blocks: the test file grew past 32 KiB"
        if pos + 7 + length > len(data):  # still being written
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data[pos + 7:pos + 7 + length])
        records.append((record.WhichOneof("record_type"), record))
        pos += 7 + length
    return records


def test_wandb_offline_run_holds_the_config_and_history(tmp_path, monkeypatch):
    for var, value in (("WANDB_SILENT", "true"), ("WANDB_MODE", "offline"), ("WANDB_DIR", tmp_path / "elsewhere"),
                       ("WANDB_CONFIG_DIR", tmp_path / "config"), ("WANDB_CACHE_DIR", tmp_path / "cache"),
                       ("WANDB_DATA_DIR", tmp_path / "data")):
        monkeypatch.setenv(var, str(value))  # no network, nothing written outside tmp_path
    run_dir = tmp_path / "run"
    loggers = open_loggers(["wandb"], run_dir, run_config={"train": {"lr": 0.01}}, wandb_project="tests")
    loggers.log(TRAIN)
    loggers.log({**TRAIN, "step": 20, "loss": 2.0})
    loggers.log({**VAL, "step": 20})
    loggers.close()
    [log_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb's service process writes the file behind run.finish(); its last record is "exit"
    deadline = time.monotonic() + 60
    records = wandb_records(log_file)
    while not any(kind == "exit" for kind, _ in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = wandb_records(log_file)
    run = next(r.run for kind, r in records if kind == "run")
    assert run.display_name == "run" and run.project == "tests"
    assert json.loads({i.key: i.value_json for i in run.config.update}["train"]) == {"lr": 0.01}
    history = {}
    for kind, record in records:
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    assert history[10]["train/loss"] == 2.5 and history[20]["train/loss"] == 2.0
    assert history[20]["val/val_loss"] == 2.75 and "train/mfu" not in history[10]


def test_other_ranks_write_nothing(tmp_path, capsys):
    loggers = open_loggers(LOGGERS, tmp_path / "run", is_main=False)
    assert loggers.backends == []
    loggers.log(TRAIN)
    loggers.close()
    assert not (tmp_path / "run").exists() and capsys.readouterr().err == ""


def test_config_errors_name_the_fix(tmp_path, monkeypatch):
    assert load_config(None, ["--train.loggers=[console,jsonl,csv,tensorboard]"]).train.loggers == [
        "console", "jsonl", "csv", "tensorboard"]
    with pytest.raises(ConfigError, match=r"unknown logger 'tensorbord'. Did you mean 'tensorboard'\? Choices: console"):
        TrainConfig(loggers=["console", "tensorbord"])
    with pytest.raises(ConfigError, match="unknown logger 'stdout'"):
        open_loggers(["stdout"], tmp_path)
    with pytest.raises(ConfigError, match="'train.wandb_project' only applies to the wandb logger"):
        TrainConfig(wandb_project="mine")
    with pytest.raises(ConfigError, match="must be one of offline, online, disabled"):
        TrainConfig(loggers=["wandb", "jsonl"], wandb_mode="cloud")
    with pytest.raises(ConfigError, match="add jsonl to train.loggers or set train.plot=false"):
        TrainConfig(loggers=["console"])
    assert TrainConfig(loggers=["console"], plot=False).loggers == ["console"]
    for name, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
        with pytest.raises(ConfigError, match=rf"pip install 'psann-lm\[{name}\]'"):
            open_loggers(["jsonl", name], tmp_path, is_main=False)  # every rank checks, not only rank 0


def test_a_training_run_writes_every_chosen_backend(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = ["the red cat sat on the blue mat. the big dog ran to the old owl. " * 4] * 6
    dp = psannLMDataPrep(text, tokenizer="byte", max_length=32, val_split=0.2, seed=0)
    lm = psannLM(base="hnet", d_model=[32, 48], num_blocks=[[1, 0, 1], [1]], n_heads=2)  # logs auxiliary metrics
    run = tmp_path / "run"
    lm.fit(dp, max_steps=4, batch_tokens=128, lr=3e-3, amp="fp32", progress=False, log_interval_steps=2,
           eval_interval_steps=2, eval_batches=1, device="cpu", checkpoint_dir=str(run),
           loggers=["console", "jsonl", "csv", "tensorboard"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 2), ("val", 2), ("train", 4), ("val", 4)]
    fields, rows = read_csv(run / "metrics.csv")
    assert {"loss", "stage0_ratio_loss", "stage0_compression", "val_loss", "val_ppl"} <= set(fields)
    assert [(r["kind"], r["step"]) for r in rows] == [("train", "2"), ("val", "2"), ("train", "4"), ("val", "4")]
    assert float(rows[2]["stage0_ratio_loss"]) == pytest.approx(records[2]["stage0_ratio_loss"])
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [s for s, _ in scalars(acc, "train/stage0_compression")] == [2, 4]
    assert scalars(acc, "val/val_loss") == [(r["step"], pytest.approx(r["val_loss"])) for r in records if r["kind"] == "val"]
    err = capsys.readouterr().err
    assert "train step 4: loss" in err and "val step 4: val_loss" in err
    assert (run / "loss_curve.png").stat().st_size > 1000


def test_norms_and_wandb_artifacts_of_a_training_run(tmp_path, monkeypatch):
    """train.log_norms adds the weight norm and each block's output RMS (H-Net: blocks at every
    stage); train.wandb_artifacts logs the final and best checkpoints and the tokenizer."""
    import torch

    from psann.lm.train.checkpoint import load_checkpoint

    for var, value in (("WANDB_SILENT", "true"), ("WANDB_MODE", "offline"), ("WANDB_CONFIG_DIR", tmp_path / "config"),
                       ("WANDB_CACHE_DIR", tmp_path / "cache"), ("WANDB_DATA_DIR", tmp_path / "data")):
        monkeypatch.setenv(var, str(value))
    text = ["the red cat sat on the blue mat. the big dog ran to the old owl. " * 4] * 6
    dp = psannLMDataPrep(text, tokenizer="byte", max_length=32, val_split=0.2, seed=0)
    lm = psannLM(base="hnet", d_model=[32, 48], num_blocks=[[1, 0, 1], [1]], n_heads=2)
    run = tmp_path / "run"
    lm.fit(dp, max_steps=2, batch_tokens=128, lr=3e-3, amp="fp32", progress=False, log_interval_steps=2,
           eval_interval_steps=2, eval_batches=1, device="cpu", checkpoint_dir=str(run), plot=False,
           loggers=["jsonl", "wandb"], log_norms=True, wandb_artifacts=True)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-2]
    assert last["kind"] == "train" and last["step"] == 2
    acts = {k for k in last if k.startswith("act_rms.")}
    assert acts == {"act_rms.stage.encoder.blocks.0", "act_rms.stage.inner.main.blocks.0",
                    "act_rms.stage.decoder.blocks.0"} and all(last[k] > 0 for k in acts)
    model = load_checkpoint(run / "checkpoints/final")[0]  # logged after the last step: the final weights
    expected = torch.sqrt(sum(p.detach().double().pow(2).sum() for p in model.parameters()))
    assert last["weight_l2_norm"] == pytest.approx(float(expected), rel=1e-6)
    [log_file] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    deadline, artifacts = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        records = wandb_records(log_file)
        artifacts = [r.artifact for kind, r in records if kind == "artifact"]
        if any(kind == "exit" for kind, _ in records):
            break
        time.sleep(0.2)
    assert sorted((a.type, a.name) for a in artifacts) == [("model", "run-model"), ("model", "run-model"),
                                                          ("tokenizer", "run-tokenizer")]
    assert [sorted(a.aliases) for a in artifacts if a.type == "model"] == [["best", "latest"], ["final", "latest"]]
