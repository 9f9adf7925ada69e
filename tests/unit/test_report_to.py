"""Rank 0's outputs (train/metrics.py): the launcher's events on stdout, and `train.report_to`'s
TensorBoard event files and offline W&B run, each read back with its own library's reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from job.config import validate
from job.events import parse_event, read_events
from job.markers import EVENT
from train import metrics
from train.metrics import MetricsLogger, missing_reporter

TRAIN = [{"step": s, "epoch": s / 4, "loss": 5.0 - s, "lr": 1e-3 * s, "tokens_per_s": 100.0 * s,
          "grad_norm": float("nan") if s == 2 else 0.5, "elapsed_s": float(s), "tokens": 10 * s} for s in (1, 2, 3)]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    # No network, no login, nothing outside tmp_path.
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb-dir"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                       "WANDB_PROJECT": "mlaunch-test"}.items():
        monkeypatch.setenv(key, value)
    import wandb

    # W&B reads its environment once per process (wandb.setup): each test starts it afresh.
    wandb.teardown()
    yield
    wandb.teardown()


def run_logger(out: Path, start_step: int, steps: list[dict], report_to: list[str]) -> None:
    log = MetricsLogger(out, enabled=True, total_steps=3, start_step=start_step, report_to=report_to,
                        run_name="tiny-job", config={"name": "tiny-job", "train": {"optim": {"lr": 0.001}}}, events=True)
    assert log.error is None
    log.start(start_step=start_step, epochs=1)
    for record in steps:
        log.log(record)
    log.log({"step": steps[-1]["step"], "eval_loss": 2.5})
    log.end(outcome="completed", steps=3, tokens=30, wall_s=4.0, train_s=1.5, export=out / "export", checkpoints=None)
    log.close()


def wandb_records(path: Path):
    """The records of a `.wandb` file, decoded with W&B's own protobuf schema. The file is
    W&B's 7-byte header, then a LevelDB-style log: 32 KiB blocks of (crc32, length, type) +
    payload chunks, type 1 a whole record, 2/3/4 its first/middle/last chunk."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_events_tensorboard_and_offline_wandb(tmp_path, offline_wandb, capsys):
    out = tmp_path / "run"
    run_logger(out, 0, TRAIN, ["tensorboard", "wandb"])
    stdout, stderr = capsys.readouterr()

    # The events: one compact JSON line each, NaN as null, the train event = the record + total_steps.
    events = [parse_event(line) for line in stdout.splitlines() if line.startswith(EVENT)]
    assert [e["event"] for e in events] == ["start", "train", "train", "train", "eval", "end"]
    assert events[0] == {"event": "start", "total_steps": 3, "start_step": 0, "epochs": 1}
    assert events[2] == {"event": "train", **TRAIN[1], "grad_norm": None, "total_steps": 3}
    end = events[-1]
    assert end["loss"] == 2.0 and end["eval_loss"] == end["best_eval_loss"] == 2.5 and end["tokens_per_s"] == 20.0
    assert end["export"] == str((out / "export").resolve()) and end["checkpoints"] is None
    assert Path(end["metrics"]).is_absolute() and Path(end["output_dir"]) == out.resolve()
    assert "step 2/3 loss 3.0000" in stderr  # the human lines stay
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[1])["grad_norm"] is None

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/tokens", "eval/loss"} <= set(tags)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(3, 2.5)]
    assert [e.step for e in acc.Scalars("train/grad_norm")] == [1, 3]  # the NaN is left out

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("*.wandb")
    records = list(wandb_records(log_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "tiny-job" and run.project == "mlaunch-test"
    assert run.run_id == (out / metrics.WANDB_ID_FILE).read_text().strip()
    assert "train" in {item.key for item in run.config.update}
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["train/step"], h["train/loss"]) for h in history if "train/loss" in h] == [(1, 4), (2, 3), (3, 2)]
    assert [(h["train/step"], h["eval/loss"]) for h in history if "eval/loss" in h] == [(3, 2.5)]
    assert {"train/lr", "train/tokens_per_s", "train/tokens", "train/epoch"} <= history[0].keys()


def test_a_resume_continues_the_same_wandb_run_and_a_fresh_start_does_not(tmp_path, offline_wandb):
    out = tmp_path / "run"
    run_logger(out, 0, TRAIN[:2], ["wandb"])
    first = (out / metrics.WANDB_ID_FILE).read_text()
    run_logger(out, 1, TRAIN[1:], ["wandb"])  # resumed from step 1
    assert (out / metrics.WANDB_ID_FILE).read_text() == first
    assert len(list((out / "wandb").glob(f"offline-run-*-{first.strip()}*"))) == 2
    run_logger(out, 0, TRAIN, ["wandb"])  # afresh in the same folder: steps begin at 1 again
    assert (out / metrics.WANDB_ID_FILE).read_text() != first


def test_events_only_under_mlaunch_and_not_on_other_ranks(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLAUNCH_RUN_ID", raising=False)
    plain = MetricsLogger(tmp_path / "a", enabled=True, total_steps=3, start_step=0)
    plain.log(TRAIN[0])
    plain.close()
    monkeypatch.setenv("MLAUNCH_RUN_ID", "r1")
    other = MetricsLogger(tmp_path / "b", enabled=False, total_steps=3, start_step=0)
    other.start(start_step=0)
    other.log(TRAIN[0])
    other.end(outcome="completed", steps=1, tokens=1, wall_s=1, train_s=1, export=None, checkpoints=None)
    assert EVENT not in capsys.readouterr().out
    rank0 = MetricsLogger(tmp_path / "c", enabled=True, total_steps=3, start_step=0)
    rank0.log(TRAIN[0])
    rank0.close()
    assert capsys.readouterr().out.startswith(EVENT + '{"event":"train","step":1,')


def test_a_missing_reporter_package_is_one_line_naming_the_pip_install(monkeypatch):
    assert missing_reporter(["tensorboard", "wandb"]) is None  # both installed here
    # The real lookup, for a package that does not exist.
    monkeypatch.setitem(metrics.REPORTER_PACKAGES, "wandb", "wandb_not_installed_here")
    line = missing_reporter(["tensorboard", "wandb"])
    assert "\n" not in line and "train.report_to" in line and "pip install wandb_not_installed_here" in line


def test_report_to_config():
    base = {"model": {"init": {}}}
    assert validate({"train": base}).train.report_to == []
    assert validate({"train": {**base, "report_to": ["tensorboard", "wandb"]}}).train.report_to == ["tensorboard", "wandb"]
    with pytest.raises(Exception, match="mlflow|tensorboard"):
        validate({"train": {**base, "report_to": ["mlflow"]}})


def test_read_events_skips_ordinary_lines_and_a_cut_last_line(tmp_path):
    log = tmp_path / "n0.log"
    log.write_text("node ready\r\n" + EVENT + '{"event":"start","total_steps":4}\r\n'
                   "step 1/4 loss 5.0\n" + EVENT + '{"event":"train","step":1,"loss":5.0}\n'
                   + EVENT + '{"event":"not json\n' + EVENT + '[1, 2]\n' + EVENT + '{"event":"train","st')
    assert read_events(log) == [{"event": "start", "total_steps": 4}, {"event": "train", "step": 1, "loss": 5.0}]
    assert read_events(tmp_path / "missing.log") == []
    assert parse_event("step 1/4") is None and parse_event(EVENT + '{"step": 1}') is None


def test_wandb_refusing_to_start_is_one_line_in_error_not_a_raise(tmp_path, offline_wandb, monkeypatch):
    # Online with no API key anywhere (no env, no netrc, not a terminal to ask on): W&B refuses
    # before any network, and the logger keeps the reason for the loop to stop every rank with.
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    log = MetricsLogger(tmp_path / "run", enabled=True, total_steps=3, start_step=0, report_to=["wandb"], events=False)
    log.close()
    assert log.error is not None and "\n" not in log.error
    assert log.error.startswith("train.report_to: wandb could not start a run") and "WANDB_MODE=offline" in log.error


def test_a_resumed_logger_drops_the_redone_steps_and_ends_with_the_whole_runs_best(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    earlier = [TRAIN[0], {"step": 1, "eval_loss": 2.0}, TRAIN[1], {"step": 2, "eval_loss": 1.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier) + '{"step": 3, "lo')
    log = MetricsLogger(out, enabled=True, total_steps=3, start_step=1, events=True)  # resumed at step 1
    log.log(TRAIN[1])
    log.log({"step": 2, "eval_loss": 3.0})
    log.end(outcome="completed", steps=2, tokens=20, wall_s=1, train_s=1, export=None, checkpoints=None)
    log.close()
    end = parse_event(capsys.readouterr().out.splitlines()[-1])
    assert (end["best_eval_loss"], end["eval_loss"], end["loss"]) == (2.0, 3.0, 3.0)
    kept = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kept == [TRAIN[0], {"step": 1, "eval_loss": 2.0}, {**TRAIN[1], "grad_norm": None}, {"step": 2, "eval_loss": 3.0}]
