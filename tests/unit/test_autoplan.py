"""`parallel: auto` through the launcher: the planner's choice is written into what the ranks read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from job.autoplan import model_config, resolve_parallel
from job.config import load_config, validate
from job.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_plan_json_auto_on_13b_is_sharded() -> None:
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", "configs/baichuan13b.yaml", "--json",
                          "--set", "train.parallel.strategy=auto"], capture_output=True, text=True, cwd=ROOT,
                         check=True, timeout=60).stdout
    par = json.loads(out)["parallel"]
    assert par["chosen_by"] == "auto" and par["strategy"] in ("fsdp", "hsdp", "pipeline")
    ddp = [c for c in par["decision"]["candidates"] if c["strategy"] == "ddp"]
    assert ddp and not any(c["fits"] for c in ddp)
    assert "ddp" in par["reason"]


def test_resolved_config_carries_the_choice(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs/baichuan13b.yaml", ["train.parallel.strategy=auto"])
    resolved, decision = resolve_parallel(cfg, standalone=False, gpus=None)
    assert resolved.train.parallel.strategy == decision.chosen.family != "auto"
    assert resolved.train.model.activation_checkpointing == decision.chosen.recompute
    assert cfg.train.parallel.strategy == "auto", "the user's config object is not mutated"


def test_dims_from_local_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3, "num_attention_heads": 4,
        "vocab_size": 1000, "model_max_length": 4096}))
    cfg = validate({"train": {"model": {"name_or_path": str(tmp_path)}, "parallel": {"strategy": "auto"}}})
    spec, source = model_config(cfg)
    assert (spec.num_hidden_layers, spec.hidden_size, spec.vocab_size) == (3, 256, 1000) and source.endswith("config.json")


def test_unknown_model_is_one_clear_error() -> None:
    cfg = validate({"train": {"model": {"name_or_path": "someone/mystery-model"}, "parallel": {"strategy": "auto"}}})
    with pytest.raises(ConfigError, match="cannot tell the size"):
        resolve_parallel(cfg, standalone=True, gpus={0: 0})


def test_nothing_fits_names_the_smallest_cluster() -> None:
    job = {"cluster": {"nodes": [{"host": "a", "gpus": 8}], "gpu": {"type": "A10"}},
           "launch": {"nproc_per_node": "auto"},
           "train": {"model": {"name_or_path": "baichuan-inc/Baichuan2-13B-Base"}, "parallel": {"strategy": "auto"},
                     "data": {"max_length": 2048, "micro_batch_size": 1}}}
    with pytest.raises(ConfigError, match=r"auto: Nothing fits.*node"):
        resolve_parallel(validate(job), standalone=False, gpus=None)


@pytest.mark.parametrize("strategy,fits", [("fsdp", True), ("ddp", False)])
def test_plan_estimates_the_layout_the_user_chose(strategy: str, fits: bool) -> None:
    """Not `auto`: the plan still says what the planner expects of the chosen layout, and a
    13B ddp run is flagged as not fitting 80 GB GPUs before anything is launched."""
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", "configs/baichuan13b.yaml", "--json",
                           "--set", f"train.parallel.strategy={strategy}"], capture_output=True, text=True, cwd=ROOT,
                          check=True, timeout=60)
    est = json.loads(proc.stdout)["parallel"]["estimate"]
    assert est["layout"].startswith(strategy) and est["fits"] is fits
    assert (est["memory_bytes"] <= est["budget_bytes"]) is fits
    text = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", "configs/baichuan13b.yaml",
                           "--set", f"train.parallel.strategy={strategy}"], capture_output=True, text=True, cwd=ROOT,
                          check=True, timeout=60).stdout
    assert ("predicted NOT to fit" in text) is not fits
