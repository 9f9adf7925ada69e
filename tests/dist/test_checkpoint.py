"""Checkpoints: a real SIGKILL + resume that must end bit-identical to an uninterrupted run, and
checkpoint folders that ranks do not share (torchrun, 2 ranks on CPU/gloo)."""

from __future__ import annotations

import re
import time
import uuid

import pytest
import torch

from tests.helpers import kill_run, read_metrics, run_train, start_train, wait_gone, write_job
from train import checkpoint as ckpt


def _exported(run_dir, lora=False):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / ("adapter_model.safetensors" if lora else "model.safetensors")))


# ddp on 3 ranks covers ddp on 2 (and DDP's bucket rebuild, which 2 ranks cannot show).
@pytest.mark.parametrize("strategy,nproc,lora", [("fsdp", 2, False), ("ddp", 3, False), ("fsdp", 2, True)])
def test_sigkill_then_resume_is_bit_identical(tmp_path, strategy, nproc, lora):
    """SIGKILL the whole torchrun job once the checkpoint of step 4 is complete, plant
    half-written checkpoints, resume with `resume: auto`: the final weights equal, bit for bit,
    those of a run that was never interrupted (same seed). Mid-epoch, across epoch ends, with
    gradient accumulation over 2 ranks. Under fsdp the resumed model is built on the meta device
    and filled from the checkpoint alone (its initial weights are never computed). Over 3 ranks
    the all-reduce's summation order shows: DDP's rebuilt bucket layout must be restored too.
    With LoRA (fsdp) the checkpoint holds only the adapters: the resumed run rebuilds the frozen
    base from its seed on the meta device and takes the adapters and their moments from it."""
    common = dict(max_steps=40, grad_accum=2, data={"max_rows": 24, "micro_batch_size": 1},
                  checkpoint={"every_steps": 2, "keep": 2}, parallel={"strategy": strategy},
                  **({"lora": {"r": 4}, "optim": {"lr": 1e-2}} if lora else {}))
    ref = write_job(tmp_path / "ref", **common)
    crash = write_job(tmp_path / "crash", **common)
    started = time.monotonic()
    r = run_train(ref, nproc=nproc, timeout=120)
    assert r.returncode == 0, r.stderr
    ref_seconds = time.monotonic() - started
    ref_ckpts = tmp_path / "ref" / "run" / "checkpoints"
    assert sorted(p.name for p in ref_ckpts.iterdir()) == ["step_000038", "step_000040"]  # keep: 2

    run_id = uuid.uuid4().hex
    proc = start_train(crash, nproc=nproc, run_id=run_id)
    ckpt_dir = tmp_path / "crash" / "run" / "checkpoints"
    deadline = time.monotonic() + ref_seconds + 60
    while not (ckpt_dir / "step_000004" / ckpt.MARKER).exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint of step 4 appeared"
        time.sleep(0.01)
    kill_run(proc, run_id)  # SIGKILL: torchrun's process group and its workers (own sessions)
    proc.wait(timeout=30)
    wait_gone(run_id)
    assert not (tmp_path / "crash" / "run" / "export").exists(), "the run finished before the kill; raise max_steps"

    # Half-written leftovers newer than any real checkpoint: resume must skip and remove them.
    (ckpt_dir / "step_000099.tmp").mkdir()
    (ckpt_dir / "step_000098").mkdir()
    (ckpt_dir / "step_000098" / "__0_0.distcp").write_bytes(b"partial")
    r = run_train(crash, nproc=nproc, timeout=120)
    assert r.returncode == 0, r.stderr
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", r.stderr)
    assert resumed and 4 <= int(resumed.group(2)) < 40, r.stderr
    if strategy == "fsdp" and not lora:
        assert "weights: from checkpoint step_" in r.stderr, r.stderr
    assert not (ckpt_dir / "step_000098").exists() and not (ckpt_dir / "step_000099.tmp").exists()

    want, got = _exported(tmp_path / "ref" / "run", lora), _exported(tmp_path / "crash" / "run", lora)
    key = "base_model.model.model.layers.1.self_attn.W_pack.lora_B.weight" if lora else "model.layers.1.self_attn.W_pack.weight"
    assert want.keys() == got.keys() and key in want
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, f"not bit-identical after resume: {different}"
    # metrics.jsonl reads as one run: each step once, the same losses.
    assert [m["step"] for m in read_metrics(tmp_path / "crash" / "run")] == list(range(1, 41))
    assert [m["loss"] for m in read_metrics(tmp_path / "crash" / "run")] == [m["loss"] for m in read_metrics(tmp_path / "ref" / "run")]


def test_checkpoint_dir_not_shared_is_refused(tmp_path):
    """Ranks that see different checkpoint folders (node-local disks) would seal checkpoints that
    lack other ranks' shards: refused at start in one line. Each rank here reads its own folder
    through ${LOCAL_RANK} (python -m train reads the YAML on every rank)."""
    cfg = write_job(tmp_path, max_steps=2, checkpoint={"dir": str(tmp_path / "ckpt-${LOCAL_RANK}")})
    r = run_train(cfg, nproc=2, timeout=120)
    assert r.returncode != 0
    assert "is not one folder for every node" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
