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
    cfg = write_job(tmp_path, max_steps=3, checkpoint={"every_steps": 2}, tensorboard=True)
    result = run_train(cfg, timeout=60)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
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
