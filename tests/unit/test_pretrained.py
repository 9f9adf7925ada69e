"""Training from a pretrained hub folder, and building sharded models without a full copy per rank.

Under fsdp/hsdp/pipeline, `train.build.build_model` builds on the meta device, the strategy
allocates only this rank's part (shards, stages), and `fill_weights` fills it: from a checkpoint
that only rank 0 reads (fsdp/hsdp) or of which each pipeline rank reads its stages' tensors, or
by replaying the seeded `model.init` piece by piece. Checked here:

* in-process: the piecewise init is bit-identical to the full model's (and leaves the RNG where
  the full init leaves it); the per-file checkpoint reader reads only the named tensors;
* torchrun workers (this file is also the worker: `torchrun ... tests/test_pretrained.py CKPT OUT`):
  every layout's built-and-filled model gathers to exactly the reference weights, from a bf16
  checkpoint and from init; each rank holds ~1/world of the parameters; a bad checkpoint is the
  same one-line error on every rank (no hang);
* `python -m train` end to end from a hub-layout folder under ddp, fsdp and a 2-stage pipeline:
  the same first loss (same weights loaded), an export that loads back with `load_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import torchrun_worker
import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = 5


def _tiny_cfg(**overrides):
    from train.models.baichuan.model import BaichuanConfig

    # vocab 129: the embedding and head shard unevenly over 2 ranks (65 + 64 rows), as FSDP pads.
    kw = dict(vocab_size=129, hidden_size=32, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
              position="rope", norm_head=True, z_loss_weight=1e-3)
    return BaichuanConfig(**{**kw, **overrides})


def _write_checkpoint(folder: Path, cfg, *, seed: int, dtype=torch.bfloat16, fmt="safetensors-sharded"):
    """A published-style folder (config.json, two weight files) of a random model; returns its weights."""
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights
    from train.models.baichuan.hub import write_hub_checkpoint

    torch.manual_seed(seed)
    model = BaichuanForCausalLM(cfg)
    init_weights(model, 0.05)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones: a norm left unloaded would show
    model.to(dtype)
    write_hub_checkpoint(model, cfg, folder, fmt)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ============================================================================== in-process
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_init_pieces_equal_the_full_model_init(position):
    """`init_pieces` replays the full model's seeded construction + init_weights piece by piece:
    the same tensors bit for bit, and the global RNG ends where the full build leaves it."""
    from train.build import init_pieces
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights

    cfg = _tiny_cfg(position=position, num_hidden_layers=3)
    torch.manual_seed(SEED)
    model = BaichuanForCausalLM(cfg)
    init_weights(model, 0.03)
    next_draw = torch.rand(4)
    full = model.state_dict()

    pieces = list(init_pieces(cfg, SEED, 0.03))
    assert torch.equal(torch.rand(4), next_draw)
    merged = {k: v for piece in pieces for k, v in piece.items()}
    assert list(merged) == list(full) and len(pieces) == cfg.num_hidden_layers + 3
    for k in full:
        assert torch.equal(merged[k], full[k]), k
    # A pipeline rank keeps only its pieces, with the same values.
    kept = [p for p in init_pieces(cfg, SEED, 0.03, keep={"model.layers.2.mlp.up_proj.weight", "lm_head.weight"})]
    assert [sorted(p)[0] for p in kept] == ["model.layers.2.input_layernorm.weight", "lm_head.weight"]
    assert torch.equal(kept[0]["model.layers.2.self_attn.W_pack.weight"], full["model.layers.2.self_attn.W_pack.weight"])
    assert torch.equal(kept[1]["lm_head.weight"], full["lm_head.weight"])


@pytest.mark.parametrize("fmt", ["safetensors-sharded", "bin-sharded"])
def test_checkpoint_files_come_one_at_a_time_and_only_the_named_tensors(tmp_path, fmt):
    from train.models.baichuan.hub import iter_checkpoint_files

    weights = _write_checkpoint(tmp_path, _tiny_cfg(), seed=1, fmt=fmt)  # .bin carries rotary inv_freq
    files = list(iter_checkpoint_files(tmp_path))
    assert len(files) == 2
    assert sorted(k for _, t in files for k in t) == sorted(weights)  # inv_freq left out
    stage = {"model.layers.3.mlp.up_proj.weight", "lm_head.weight"}
    only = list(iter_checkpoint_files(tmp_path, names=stage))
    assert len(only) == 1 and set(only[0][1]) == stage  # the other file yields nothing
    assert all(torch.equal(only[0][1][k], weights[k]) for k in stage)


# ============================================================================== torchrun: the building
def _launch_worker(tmp_path: Path) -> dict:
    ckpt = tmp_path / "ckpt"
    _write_checkpoint(ckpt, _tiny_cfg(), seed=1)
    _write_checkpoint(tmp_path / "narrow", _tiny_cfg(intermediate_size=40), seed=2)  # shapes differ
    _write_checkpoint(tmp_path / "short", _tiny_cfg(num_hidden_layers=3), seed=2)  # layer 3 missing
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(__file__)), str(tmp_path), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"workers failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_sharded_builds_hold_their_part_and_load_exact_weights(tmp_path):
    result = _launch_worker(tmp_path)
    n_params = result["n_params"]
    assert {(r["layout"], r["source"]) for r in result["runs"]} == {
        (layout, source) for layout in ("fsdp", "hsdp", "pipeline", "pipeline-interleaved", "fsdp-local-read")
        for source in ("init", "pretrained")}
    for r in result["runs"]:
        what = f"{r['layout']} from {r['source']}"
        assert r["built_on_meta"], what
        assert r["max_abs_diff"] == 0.0 and r["keys_ok"], f"{what}: weights differ from the reference"
        # No rank ever held the full model: each holds its half (+ FSDP's padding of 129 rows).
        assert sum(r["held"]) >= n_params and max(r["held"]) <= 0.52 * n_params, (what, r["held"], n_params)
    for case, errors in result["errors"].items():
        assert len(errors) == 2 and len(set(errors)) == 1, (case, errors)  # the same error on both ranks
        assert errors[0].startswith("train.model.name_or_path: ") and "\n" not in errors[0], errors
        assert ("shape mismatch" if case.startswith("narrow") else "missing keys: model.layers.3") in errors[0]


# ============================================================================== python -m train end to end
@pytest.mark.slow
def test_pretrained_folder_trains_under_ddp_fsdp_and_pipeline(tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import read_metrics, run_train, tiny_tokenizer, write_job
    from train.models.baichuan.hub import load_pretrained

    tok = tiny_tokenizer(tmp_path.parent)
    ckpt = tmp_path / "ckpt"
    source = _write_checkpoint(ckpt, _tiny_cfg(vocab_size=512, num_hidden_layers=2), seed=3, dtype=torch.float32)
    shutil.copyfile(tok, ckpt / "tokenizer.model")
    # ddp/fsdp: 2 ranks x 2 rows; the pipeline's one replica takes the same 4-row global batches.
    layouts = {"ddp": ({"strategy": "ddp"}, 2), "fsdp": ({"strategy": "fsdp"}, 2),
               "pipeline": ({"strategy": "pipeline", "pp": 2}, 4)}
    first, held, exports = {}, {}, {}
    for name, (parallel, rows) in layouts.items():
        job = write_job(tmp_path / name, model={"init": None, "name_or_path": str(ckpt)}, tokenizer={"path": None},
                        parallel=parallel, data={"micro_batch_size": rows, "eval_fraction": 0}, max_steps=2)
        result = run_train(job, nproc=2, timeout=90)
        assert result.returncode == 0, f"{name}:\n{result.stderr[-6000:]}"
        first[name] = read_metrics(tmp_path / name / "run")[0]["loss"]
        match = re.search(r"parameters held per rank right after building: min (\d+) max (\d+) of (\d+)", result.stderr)
        assert match, result.stderr[-3000:]
        held[name] = [int(g) for g in match.groups()]
        exported, _ = load_pretrained(tmp_path / name / "run" / "export")
        assert {k: v.shape for k, v in exported.state_dict().items()} == {k: v.shape for k, v in source.items()}
        exports[name] = load_file(tmp_path / name / "run" / "export" / "model.safetensors")

    assert all(abs(loss - first["ddp"]) <= 1e-5 * first["ddp"] for loss in first.values()), first
    n = held["ddp"][2]
    assert held["ddp"][:2] == [n, n]  # ddp: the full model on every rank
    assert held["fsdp"][1] <= n // 2 + 1 and held["pipeline"][1] < n, held  # fsdp: its half; pipeline: its stage
    for name in ("fsdp", "pipeline"):  # two steps later the three runs still agree
        assert max(float((exports[name][k] - v).abs().max()) for k, v in exports["ddp"].items()) <= 1e-4, name


# ============================================================================== worker side
def _layouts():
    from train.parallel.base import ParallelDims

    pipe = {"strategy": "pipeline", "pp": 2, "microbatches": 2}
    return [
        ("fsdp", ParallelDims(2, "fsdp", dp=2), {"strategy": "fsdp"}),
        ("hsdp", ParallelDims(2, "hsdp", dp=2, dp_shard_in_node=2), {"strategy": "hsdp"}),
        ("pipeline", ParallelDims(2, "pipeline", dp=1, pp=2), pipe),
        ("pipeline-interleaved", ParallelDims(2, "pipeline", dp=1, pp=2),
         {**pipe, "schedule": "interleaved_1f1b", "stages_per_rank": 2}),
        # FSDP shards filled by every rank reading the file itself: what a pipeline stage sharded
        # over its dp ranks (dp_shard) does, which needs a world of 4 to run for real.
        ("fsdp-local-read", ParallelDims(2, "fsdp", dp=2), {"strategy": "fsdp"}),
    ]


def _build(name, dims, parallel, source: str, folder: Path, fill_from: Path | None = None):
    """build_model + parallelize + fill_weights as train.loop runs them (`fill_from`: another folder
    to fill from than the one the model was built from: a mismatching checkpoint)."""
    import dataclasses

    from job.config import TrainConfig
    from train.build import build_model, fill_weights
    from train.models.baichuan.hub import load_weights_distributed
    from train.parallel.base import parallelize
    from train.parallel.mesh import build_mesh

    cfg = _tiny_cfg()
    model_section = ({"name_or_path": str(folder)} if source == "pretrained" else
                     {"init": {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                               "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
                               "vocab_size": cfg.vocab_size, "initializer_range": 0.03}, "norm_head": True})
    tcfg = TrainConfig.model_validate({"model": model_section, "device": "cpu", "parallel": parallel, "seed": SEED})
    device = torch.device("cpu")
    model, mcfg, pending = build_model(tcfg, cfg.vocab_size, folder if source == "pretrained" else None, device, dims)
    on_meta = all(p.is_meta for p in model.parameters())
    par = parallelize(model, dims=dims, mesh=build_mesh(dims, device), cfg=tcfg, device=device, z_loss_weight=0.0)
    if fill_from is not None:
        pending = dataclasses.replace(pending, checkpoint=fill_from)
    if name == "fsdp-local-read" and source == "pretrained":
        load_weights_distributed(par._single_module(), folder, broadcast_from_rank0=False)
    else:
        fill_weights(par, pending, mcfg, dims)
    return par, mcfg, on_meta


def _worker(tmp: str, out_path: str) -> None:
    import gc

    import torch.distributed as dist

    from job.errors import ConfigError
    from train.build import params_held_per_rank
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights, num_params

    folder = Path(tmp)

    def body(env) -> None:
        cfg = _tiny_cfg()
        torch.manual_seed(SEED)
        reference_init = BaichuanForCausalLM(cfg)  # what a single process builds from `init`
        init_weights(reference_init, 0.03)
        references = {"init": reference_init.state_dict(), "pretrained": None}
        from safetensors.torch import load_file

        references["pretrained"] = {k: v for f in sorted((folder / "ckpt").glob("*.safetensors"))
                                    for k, v in load_file(f).items()}
        result: dict = {"n_params": num_params(cfg), "runs": [], "errors": {}}
        for name, dims, parallel in _layouts():
            for source in ("init", "pretrained"):
                par, _, on_meta = _build(name, dims, parallel, source, folder / "ckpt")
                held = params_held_per_rank(par)
                full = par.full_state_dict_for_export()
                if env.is_rank0:
                    ref = references[source]
                    result["runs"].append({
                        "layout": name, "source": source, "built_on_meta": on_meta, "held": held,
                        "keys_ok": sorted(full) == sorted(ref),
                        "max_abs_diff": max(float((full[k] - ref[k].float()).abs().max()) for k in ref),
                    })
                del par, full
                gc.collect()
        for case, layout in [("narrow-fsdp", 0), ("short-fsdp", 0), ("short-pipeline", 2)]:
            name, dims, parallel = _layouts()[layout]
            try:
                _build(name, dims, parallel, "pretrained", folder / "ckpt", fill_from=folder / case.split("-")[0])
                error = None
            except ConfigError as e:
                error = str(e)
            errors: list = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            result["errors"][case] = errors
        if env.is_rank0:
            Path(out_path).write_text(json.dumps(result, indent=1))

    torchrun_worker(body)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
