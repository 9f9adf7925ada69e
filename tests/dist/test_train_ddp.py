"""DDP training: real torchrun runs on CPU/gloo."""

from __future__ import annotations

import math

import pytest

from tests.helpers import read_eval_metrics, read_metrics, run_train, write_job


def test_world2_micro_b_matches_world1_micro_2b(tmp_path):
    """Loss normalised by the global token count: 2 ranks × micro-batch 1 follow the trajectory of
    1 rank × micro-batch 2 (same global batches, other padding), with gradient accumulation and
    DDP's no_sync in play. 16 rows repeated over ~2 epochs: the loss must also fall."""
    common = dict(max_steps=8, grad_accum=2, eval_every=4, checkpoint={"export": False})
    two = write_job(tmp_path / "w2", **common, data={"max_rows": 16, "micro_batch_size": 1})
    one = write_job(tmp_path / "w1", **common, data={"max_rows": 16, "micro_batch_size": 2})
    r2 = run_train(two, nproc=2, timeout=90)
    assert r2.returncode == 0, r2.stderr
    r1 = run_train(one, nproc=1, timeout=90)
    assert r1.returncode == 0, r1.stderr

    m2, m1 = read_metrics(tmp_path / "w2" / "run"), read_metrics(tmp_path / "w1" / "run")
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, 9))
    for a, b in zip(m2, m1):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
        assert a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["tokens_per_s"] > 0 and 0 < a["real_token_fraction"] <= 1 and a["elapsed_s"] >= 0
    e2, e1 = read_eval_metrics(tmp_path / "w2" / "run"), read_eval_metrics(tmp_path / "w1" / "run")
    assert [r["step"] for r in e2] == [4, 8]
    assert all(abs(a["eval_loss"] - b["eval_loss"]) <= 1e-5 for a, b in zip(e2, e1))
    # World 2 pads each half of a global batch to its own longest example: less padding.
    assert sum(r["real_token_fraction"] for r in m2) >= sum(r["real_token_fraction"] for r in m1)
    assert m1[-1]["loss"] < m1[0]["loss"] - 1.0 and math.isfinite(m1[-1]["loss"])
