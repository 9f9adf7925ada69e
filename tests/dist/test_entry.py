"""`python -m train`: user errors are one line with exit 2; alone (no torchrun) it trains; SIGTERM
stops it cleanly with a non-zero exit and no half-written checkpoint."""

from __future__ import annotations

import json
import signal
import time
import uuid

import pytest
import yaml

from tests.helpers import kill_run, read_metrics, run_train, start_train, wait_gone, write_job
from job.events import parse_event
from job.markers import BEAT, STARTED
from train.checkpoint import MARKER, complete_checkpoints


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"max_step": 3}, "unknown key `train.max_step`; did you mean `max_steps`?"),
        ({"parallel": {"strategy": "pipeline", "pp": 2}}, "does not divide the world size 1"),
        ({"tokenizer": {"path": "/nonexistent/tokenizer.model"}}, "train.tokenizer.path"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, train, message):
    result = run_train(write_job(tmp_path, **train), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exit_2(tmp_path):
    result = run_train(tmp_path / "nope.yaml", timeout=60)
    assert result.returncode == 2 and "config file not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_alone_without_torchrun_trains_and_exports(tmp_path):
    cfg = write_job(tmp_path, max_steps=3, checkpoint={"every_steps": 2}, report_to=["tensorboard", "wandb"])
    wandb_env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb-dir"),
                 "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}
    result = run_train(cfg, timeout=60, env=wandb_env)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    # Rank 0's events for the launcher (run under a run id, as mlaunch does), and only those on stdout.
    lines = [line for line in result.stdout.splitlines() if not line.startswith((STARTED, BEAT))]
    events = [parse_event(line) or line for line in lines]
    assert [e["event"] if isinstance(e, dict) else e for e in events] == ["start", "train", "train", "train", "eval", "end"]
    assert events[0]["total_steps"] == 3 and events[0]["start_step"] == 0 and events[0]["world_size"] == 1
    assert events[3]["step"] == 3 and events[3]["tokens"] > events[1]["tokens"] > 0
    end = events[-1]
    assert end["outcome"] == "completed" and end["steps"] == 3 and end["eval_loss"] == events[4]["eval_loss"]
    assert end["export"] == str((run / "export").resolve()) and end["checkpoints"] == str((run / "checkpoints").resolve())
    assert end["tokens"] == events[3]["tokens"] and end["tokens_per_s"] > 0
    assert (run / "tensorboard").is_dir() and list((run / "wandb").glob("offline-run-*/*.wandb"))
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"step", "epoch", "loss", "lr", "tokens_per_s", "padded_tokens_per_s", "real_token_fraction", "grad_norm",
            "elapsed_s"} <= metrics[0].keys()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 3
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [2, 3]
    exported = json.loads((run / "export" / "config.json").read_text())
    assert exported["hidden_size"] == 32 and (run / "export" / "tokenizer.model").is_file()
    assert "skipped" in result.stderr  # the bad-row count is reported


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_signal_stops_cleanly_with_nonzero_exit(tmp_path, sig):
    cfg = write_job(tmp_path, max_steps=100000, checkpoint={"every_steps": 3, "export": True})
    run_id = uuid.uuid4().hex
    proc = start_train(cfg, run_id=run_id)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        kill_run(proc, run_id)
        wait_gone(run_id)
    assert proc.returncode == 128 + sig, err
    assert "stopped by signal" in err and "Traceback" not in err
    ckpts = tmp_path / "run" / "checkpoints"
    assert not list(ckpts.glob("*.tmp")) and all((p / MARKER).is_file() for p in ckpts.iterdir())
    assert not (tmp_path / "run" / "export").exists()  # stopped early: nothing exported
