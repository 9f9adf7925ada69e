"""LoRA in-process: the config's one-line errors, the adapters on the project's model (what trains,
their seeded init on any device), and what the planner says of LoRA and QLoRA runs. The real runs
are in tests/dist/test_lora.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from job.autoplan import check_lora, resolve_parallel
from job.baichuan import VARIANTS, BaichuanConfig
from job.config import LORA_TARGETS, LoraConfig, load_config, validate
from job.errors import ConfigError
from job.planner import Adapters, ClusterSpec, GiB, Workload, plan_parallel

ROOT = Path(__file__).resolve().parents[2]
TINY = BaichuanConfig(vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                      norm_head=True)


@pytest.mark.parametrize("key,value,message", [
    ("r", 0, "`train.lora.r`: Input should be greater than 0 (got 0)"),
    ("alpha", -1, "`train.lora.alpha`: Input should be greater than 0 (got -1)"),
    ("dropout", 1, "`train.lora.dropout`: Input should be less than 1 (got 1)"),
    ("quantize", "8bit", "`train.lora.quantize`: Input should be 'none' or '4bit' (got '8bit')"),
])
def test_bad_lora_settings_are_one_line_exit_2(key, value, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "tiny.yaml", [f"train.lora.{key}={value}"])
    assert message in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2


def _model(device="cpu"):
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights

    with torch.device(device):
        model = BaichuanForCausalLM(TINY)
    if device != "meta":
        torch.manual_seed(0)
        init_weights(model)
    return model


def test_a_target_that_is_not_in_the_model_lists_the_ones_that_are():
    from train.lora import apply_lora

    expected = ("train.lora.target_modules: q_proj is not a module of the model; its linear layers are "
                "W_pack, o_proj, gate_proj, up_proj, down_proj")
    with pytest.raises(ConfigError) as e:
        apply_lora(_model(), LoraConfig(target_modules=["q_proj", "o_proj"]), torch.device("cpu"), torch.float32)
    assert str(e.value) == expected
    # `mlaunch plan` says it before anything starts, in the spec's words.
    job = validate({"train": {"model": {"init": {}}, "lora": {"target_modules": ["q_proj"]}}})
    with pytest.raises(ConfigError, match=r"q_proj not in the model; its linear layers are W_pack, o_proj"):
        check_lora(job, standalone=True, gpus={0: 0})


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU host plans for its GPUs")
def test_qlora_on_cpu_is_refused_at_plan_time():
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", "configs/tiny.yaml", "--set",
                           "train.lora.quantize=4bit"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "train.lora.quantize: 4bit (QLoRA) needs CUDA GPUs" in proc.stderr


@pytest.mark.parametrize("parallel,lora,message", [
    ({"strategy": "pipeline", "pp": 2}, {}, "train.lora runs under ddp and fsdp/hsdp, not pipeline"),
    ({"strategy": "fsdp"}, {"quantize": "4bit"}, "train.lora.quantize: 4bit runs under ddp, not fsdp"),
])
def test_layouts_lora_does_not_run_are_refused_at_plan_time(parallel, lora, message):
    job = validate({"train": {"model": {"init": {}}, "parallel": parallel, "lora": lora}})
    with pytest.raises(ConfigError, match=message):
        check_lora(job, standalone=True, gpus={0: 8})


def test_only_adapters_train_and_their_seeded_init_is_the_same_built_anywhere():
    """The spec's adapter count is peft's; the base is frozen; a model built on the meta device
    (fsdp's path) gets the same adapters from `init_adapters` as a complete one, and neither the
    injection nor the init moves the global RNG."""
    from train.lora import apply_lora, init_adapters

    cfg = LoraConfig(r=4, target_modules=["W_pack", "down_proj"])
    complete = apply_lora(_model(), cfg, torch.device("cpu"), torch.bfloat16)
    trains = {n: p for n, p in complete.named_parameters() if p.requires_grad}
    assert trains and all(".lora_" in n and p.dtype == torch.float32 for n, p in trains.items())
    assert sum(p.numel() for p in trains.values()) == TINY.lora_params(4, ["W_pack", "down_proj"]) == 2 * (4 * (32 + 96) + 4 * (72 + 32))
    assert all(p.dtype == torch.bfloat16 for n, p in complete.named_parameters() if not p.requires_grad)

    rng = torch.get_rng_state()
    init_adapters(complete, seed=7)
    meta = apply_lora(_model("meta"), cfg, torch.device("cpu"), torch.bfloat16).to_empty(device="cpu")
    init_adapters(meta, seed=7)
    assert torch.equal(rng, torch.get_rng_state())
    meta_state = meta.state_dict()
    for name, value in complete.state_dict().items():
        if ".lora_" in name:
            assert torch.equal(meta_state[name], value), name
    assert any(v.abs().sum() > 0 for n, v in meta_state.items() if ".lora_A." in n)
    assert all(v.abs().sum() == 0 for n, v in meta_state.items() if ".lora_B." in n)  # starts at the base model


def test_lora_merge_is_the_adapted_forward():
    """merged_state (export's `merged/`, load_for_inference) equals peft's unmerged forward."""
    from train.lora import apply_lora, merged_state, split_state

    model = apply_lora(_model(), LoraConfig(r=4, alpha=8), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.1)
    base, adapters = split_state(model.state_dict())
    plain = _model()
    plain.load_state_dict(merged_state(base, adapters, 8 / 4))
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(plain(ids), model(ids), atol=1e-5)


# ------------------------------------------------------------------------------ the planner
B13 = VARIANTS["baichuan-13b"]


def _plan(gpu: str, gpus: int, lora: Adapters | None, micro_batch: int):
    return plan_parallel(B13, ClusterSpec.from_gpu_type(gpu, 1, gpus),
                         Workload(seq_len=1024, micro_batch=micro_batch, grad_accum=2, lora=lora), hint=False)


def test_planner_lora_memory_is_frozen_base_plus_trained_adapters():
    lora = Adapters(r=8)
    n = B13.lora_params(8, LORA_TARGETS)
    assert n == 40 * 8 * ((5120 + 3 * 5120) + 2 * 5120 + 2 * (5120 + 13696) + (13696 + 5120))
    mem = _plan("H100", 1, lora, 1).chosen.memory
    assert mem["params"] == 2 * B13.num_params + 4 * n  # bf16 base, fp32 adapters
    assert (mem["grads"], mem["optimizer"]) == (4 * n, 8 * n)
    q = _plan("RTX4090", 1, Adapters(r=8, quantize="4bit"), 1).chosen.memory
    assert 0.25 < (q["params"] - 4 * n) / (2 * B13.num_params) < 0.3  # NF4 layers, bf16 embedding and head


def test_planner_says_where_13b_lora_and_qlora_fit():
    lora = Adapters(r=8)
    # 8 × 80 GB: full fine-tuning must shard; LoRA fits a replica per GPU, and ddp is the fastest.
    assert _plan("H100", 8, None, 2).chosen.family == "fsdp"
    chosen = _plan("H100", 8, lora, 2).chosen
    assert chosen.strategy == "ddp" and chosen.recompute == "none"
    # One 80 GB GPU: LoRA fits, full fine-tuning does not.
    assert _plan("H100", 1, lora, 1).chosen.memory["total"] < 40 * GiB
    assert _plan("H100", 1, None, 1).chosen is None
    # One 24 GB GPU: QLoRA fits, bf16 LoRA does not.
    assert _plan("RTX4090", 1, Adapters(r=8, quantize="4bit"), 1).chosen is not None
    assert _plan("RTX4090", 1, lora, 1).chosen is None


def test_mlaunch_plan_picks_ddp_for_13b_lora():
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", "configs/baichuan13b.yaml", "--json",
                          "--set", "train.parallel.strategy=auto", "--set", "train.lora.r=8"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    par = json.loads(out.stdout)["parallel"]
    assert par["strategy"] == "ddp" and par["decision"]["chosen"]["fits"], par["reason"]
    assert any(note.startswith("LoRA r=8: 27,893,760 trainable adapter parameters") for note in par["decision"]["notes"])
    # On one 80 GB GPU, the layout the user chose: predicted to fit.
    job = load_config(ROOT / "configs" / "baichuan13b.yaml", ["train.lora.r=8", "train.parallel.strategy=auto",
                                                              "train.data.micro_batch_size=1"])
    one_gpu = job.model_copy(update={"cluster": job.cluster.model_copy(update={"nodes": job.cluster.nodes[:1]})})
    one_gpu.launch.nproc_per_node = 1
    resolved, decision = resolve_parallel(one_gpu, standalone=False, gpus=None)
    assert resolved.train.parallel.strategy == "ddp" and decision.chosen.fits
