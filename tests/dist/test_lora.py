"""LoRA through peft, end to end: real runs (`python -m train`, torchrun on CPU/gloo), and their
exports loaded the three ways a user would. Kill + resume of a LoRA run under fsdp is in
tests/dist/test_checkpoint.py, the planner's LoRA memory against held bytes in
tests/dist/test_memory_model.py."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import read_metrics, run_train, write_job


def _last_checkpoint_state(ckpt_dir):
    """The newest DCP checkpoint as plain tensors, and its keys (read without a process group)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from train.checkpoint import complete_checkpoints

    _, path = complete_checkpoints(ckpt_dir)[-1]
    keys = list(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    out = path.parent / "as_torch.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False), keys


def test_lora_run_learns_only_adapters_and_its_exports_load(tmp_path):
    """One rank (micro-batch 2, full recomputation) and two ddp ranks (micro-batch 1, none) follow
    the same trajectory; the loss falls; the frozen base leaves the run bit-identical to its seeded
    init; the checkpoint holds only adapters and their moments; the adapter export loads with
    `PeftModel.from_pretrained` onto the base, the merged export with the project's loader, and
    `load_for_inference`: all give the logits of the trained model (the base + the checkpoint's
    adapters, built here with the project's own LoRA code)."""
    from peft import PeftModel

    from job.baichuan import read_config_json
    from job.config import LORA_TARGETS, load_config
    from train import lora
    from train.build import init_pieces
    from train.models.baichuan.hub import build_empty_model, iter_checkpoint_tensors, load_pretrained
    from job.baichuan import BaichuanConfig

    common = dict(max_steps=8, grad_accum=2, optim={"lr": 1e-2}, lora={"r": 4, "alpha": 8, "merge": True},
                  checkpoint={"every_steps": 4, "export_dtype": "float32"})
    one = write_job(tmp_path / "w1", **common, data={"max_rows": 16, "micro_batch_size": 2},
                    model={"activation_checkpointing": "full"})
    two = write_job(tmp_path / "w2", **common, data={"max_rows": 16, "micro_batch_size": 1},
                    parallel={"strategy": "ddp"})
    r1 = run_train(one, timeout=90)
    assert r1.returncode == 0, r1.stderr
    assert "trainable parameters" in r1.stderr and "the base is frozen" in r1.stderr
    r2 = run_train(two, nproc=2, timeout=90)
    assert r2.returncode == 0, r2.stderr
    m1, m2 = read_metrics(tmp_path / "w1" / "run"), read_metrics(tmp_path / "w2" / "run")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, 9))
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    assert m1[-1]["loss"] < m1[0]["loss"] - 0.3, [r["loss"] for r in m1]

    run = tmp_path / "w1" / "run"
    export = run / "export"
    mcfg = BaichuanConfig.from_hf_dict(read_config_json(export / "base"))
    # The frozen base, exported from the trained model, is its seeded init bit for bit.
    init = {k: v for piece in init_pieces(mcfg, 42, mcfg.initializer_range) for k, v in piece.items()}
    base = dict(iter_checkpoint_tensors(export / "base"))
    assert base.keys() == init.keys() and all(torch.equal(base[k], init[k]) for k in init)

    # Only what trains: adapters (and, in the optimizer, their moments and steps).
    state, keys = _last_checkpoint_state(run / "checkpoints")
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys
    assert all(".lora_" in k for k in keys if k.startswith("optim.state."))
    n_adapters = mcfg.lora_params(4, LORA_TARGETS)
    assert sum(state["model"][k].numel() for k in state["model"]) == n_adapters

    # The trained model: the base plus the checkpoint's adapters, in the project's module tree.
    cfg = load_config(one).train
    trained = build_empty_model(mcfg)
    trained.load_state_dict(init)
    lora.apply_lora(trained, cfg.lora, torch.device("cpu"), torch.float32)
    missing, unexpected = trained.load_state_dict(state["model"], strict=False)
    assert not unexpected and all(".lora_" not in k for k in missing)
    ids = torch.randint(3, mcfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.eval()(ids)
        base_model, _ = load_pretrained(export / "base")
        via_peft = PeftModel.from_pretrained(base_model, str(export)).eval()(ids)
        merged = load_pretrained(export / "merged")[0].eval()(ids)
        loaded, tokenizer, train_cfg = lora.load_for_inference(export, "cpu", torch.float32)
        via_loader = loaded(ids)
    assert (via_peft - want).abs().max() < 1e-5
    assert (merged - want).abs().max() < 1e-4 and (via_loader - want).abs().max() < 1e-4
    assert tokenizer == export / "tokenizer.model" and train_cfg.lora.r == 4
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((export / "base").resolve()) and config["r"] == 4
    assert config["target_modules"] and set(config["target_modules"]) == set(LORA_TARGETS)
