"""Training from a pretrained hub folder, and building sharded models without a full copy per rank.

Under fsdp/hsdp/pipeline, `train.build.build_model` builds on the meta device, the strategy
allocates only this rank's part (shards, stages), and `fill_weights` fills it: from a checkpoint
that only rank 0 reads (fsdp/hsdp) or of which each pipeline rank reads its stages' tensors, or
by replaying the seeded `model.init` piece by piece. Checked here:

* in-process (tests/unit/test_pretrained.py): the piecewise init is bit-identical to the full
  model's (and leaves the RNG where the full init leaves it); the per-file checkpoint reader reads
  only the named tensors;
* torchrun workers (this file is also the worker: `torchrun ... tests/dist/test_pretrained.py CKPT OUT`):
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

import torch

from tests.helpers import tiny_baichuan_config, torchrun_worker, write_hub_folder

ROOT = Path(__file__).resolve().parents[2]
SEED = 5


# ============================================================================== torchrun: the building
def _launch_worker(tmp_path: Path) -> dict:
    ckpt = tmp_path / "ckpt"
    write_hub_folder(ckpt, tiny_baichuan_config(), seed=1)
    write_hub_folder(tmp_path / "narrow", tiny_baichuan_config(intermediate_size=40), seed=2)  # shapes differ
    write_hub_folder(tmp_path / "short", tiny_baichuan_config(num_hidden_layers=3), seed=2)  # layer 3 missing
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(__file__)), str(tmp_path), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"workers failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


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
def test_pretrained_folder_trains_under_ddp_fsdp_and_pipeline(tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import read_metrics, run_train, tiny_tokenizer, write_job
    from train.models.baichuan.hub import load_pretrained

    tok = tiny_tokenizer(tmp_path.parent)
    ckpt = tmp_path / "ckpt"
    source = write_hub_folder(ckpt, tiny_baichuan_config(vocab_size=512, num_hidden_layers=2), seed=3, dtype=torch.float32)
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
    from job.layout import Layout

    pipe = {"strategy": "pipeline", "pp": 2, "microbatches": 2}
    return [
        ("fsdp", Layout(dp_shard=2), {"strategy": "fsdp"}),
        # hsdp on one "node" of 2: one replica of 2 shards (the same layout as fsdp).
        ("hsdp", Layout(dp_replicate=1, dp_shard=2), {"strategy": "hsdp"}),
        ("pipeline", Layout(pp=2), pipe),
        ("pipeline-interleaved", Layout(pp=2),
         {**pipe, "schedule": "interleaved_1f1b", "stages_per_rank": 2}),
        # FSDP shards filled by every rank reading the file itself: what a pipeline stage sharded
        # over its dp ranks (stage_dp: fsdp) does, which needs a world of 4 to run for real.
        ("fsdp-local-read", Layout(dp_shard=2), {"strategy": "fsdp"}),
    ]


def _build(name, dims, parallel, source: str, folder: Path, fill_from: Path | None = None):
    """build_model + parallelize + fill_weights as train.loop runs them (`fill_from`: another folder
    to fill from than the one the model was built from: a mismatching checkpoint)."""
    import dataclasses

    from job.config import TrainConfig
    from train.build import build_model, fill_weights
    from train.models.baichuan.hub import load_weights_distributed
    from train.models.baichuan.parallelize import BAICHUAN
    from train.parallel.base import parallelize
    from train.parallel.mesh import build_mesh

    cfg = tiny_baichuan_config()
    model_section = ({"name_or_path": str(folder)} if source == "pretrained" else
                     {"init": {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                               "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
                               "vocab_size": cfg.vocab_size, "initializer_range": 0.03}, "norm_head": True})
    tcfg = TrainConfig.model_validate({"model": model_section, "device": "cpu", "parallel": parallel, "seed": SEED})
    device = torch.device("cpu")
    model, mcfg, pending = build_model(tcfg, cfg.vocab_size, folder if source == "pretrained" else None, device, dims)
    on_meta = all(p.is_meta for p in model.parameters())
    par = parallelize(model, layout=dims, mesh=build_mesh(dims, device), cfg=tcfg, device=device, z_loss_weight=0.0,
                      arch=BAICHUAN)
    if fill_from is not None:
        pending = dataclasses.replace(pending, checkpoint=fill_from)
    if name == "fsdp-local-read" and source == "pretrained":
        load_weights_distributed(par.state_dict_module(), folder, broadcast_from_rank0=False)
    else:
        fill_weights(par, pending, mcfg, dims)
    return par, mcfg, on_meta


def _worker(tmp: str, out_path: str) -> None:
    import gc

    import torch.distributed as dist

    from job.errors import ConfigError
    from train.build import params_held_per_rank
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights

    folder = Path(tmp)

    def body(env) -> None:
        cfg = tiny_baichuan_config()
        torch.manual_seed(SEED)
        reference_init = BaichuanForCausalLM(cfg)  # what a single process builds from `init`
        init_weights(reference_init, 0.03)
        references = {"init": reference_init.state_dict(), "pretrained": None}
        from safetensors.torch import load_file

        references["pretrained"] = {k: v for f in sorted((folder / "ckpt").glob("*.safetensors"))
                                    for k, v in load_file(f).items()}
        result: dict = {"n_params": cfg.num_params, "runs": [], "errors": {}}
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
