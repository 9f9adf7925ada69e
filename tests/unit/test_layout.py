"""The one layout type (job.layout.Layout) and the one Baichuan spec (job.baichuan): what the
planner estimates is what the config says and what the ranks build, by construction."""

from __future__ import annotations

import pytest

from job.autoplan import resolve_parallel
from job.baichuan import VARIANTS, BaichuanConfig, from_model_config
from job.config import ModelConfig, ParallelConfig, validate
from job.errors import ConfigError
from job.layout import Layout
from job.planner import ClusterSpec, Workload, enumerate_candidates


@pytest.mark.parametrize("nnodes, gpus", [(1, 1), (1, 8), (2, 8), (4, 4), (3, 2)])
def test_every_planner_candidate_round_trips_through_the_config(nnodes, gpus):
    """auto writes a candidate's layout into train.parallel (`to_config`); the ranks read it back
    (`from_config`): the same degrees, for every layout the planner can choose."""
    cluster = ClusterSpec.from_gpu_type("H100", nnodes, gpus)
    candidates = enumerate_candidates(VARIANTS["baichuan2-13b"], cluster, Workload(seq_len=512), recompute=["none"])
    assert candidates
    for c in candidates:
        pcfg = c.layout.to_config(ParallelConfig(strategy="auto"))
        assert pcfg.strategy == c.family != "auto"
        assert Layout.from_config(pcfg, cluster.world_size, gpus) == c.layout, c.label
        assert c.layout.world_size == cluster.world_size


def test_strategy_is_derived_from_the_degrees():
    assert Layout(dp_replicate=8).strategy == "ddp"
    assert Layout(dp_shard=8).strategy == "fsdp"
    assert Layout(dp_replicate=2, dp_shard=8).strategy == "hsdp"
    assert Layout(dp_replicate=1, dp_shard=8).strategy == "fsdp"  # one node of shards: fsdp
    assert Layout(dp_shard=1).strategy == "ddp"  # one rank: nothing to shard
    p = Layout(dp_shard=4, pp=2)
    assert (p.strategy, p.stage_dp, p.name, p.dp, p.world_size) == ("pipeline", "fsdp", "pipeline+fsdp", 4, 8)
    assert Layout(dp_replicate=4, pp=2).name == "pipeline+ddp" and Layout(pp=4).name == "pipeline"
    assert str(Layout(dp_replicate=2, dp_shard=8)) == "hsdp(dp_replicate=2, dp_shard=8)"
    assert Layout(dp_replicate=2, dp_shard=4).mesh_shape() == ((2, 4), ("dp_replicate", "dp_shard"))
    assert Layout(dp_shard=4, pp=2).mesh_shape() == ((2, 4), ("pp", "dp"))


def test_stage_dp_and_the_old_boolean_key(capsys):
    job = validate({"train": {"model": {"init": {}}, "parallel": {"strategy": "pipeline", "pp": 2, "dp_shard": True}}})
    assert job.train.parallel.stage_dp == "fsdp"
    assert "dp_shard is deprecated" in capsys.readouterr().err
    assert Layout.from_config(job.train.parallel, 8, 4) == Layout(dp_shard=4, pp=2)
    with pytest.raises(ConfigError, match="stage_dp"):
        validate({"train": {"model": {"init": {}}, "parallel": {"stage_dp": "zero3"}}})


def test_auto_writes_the_chosen_layout_and_the_ranks_rebuild_it():
    cfg = validate({"cluster": {"nodes": [{"host": f"n{i}", "gpus": 8} for i in range(2)]},
                    "train": {"model": {"name_or_path": "baichuan-inc/Baichuan2-13B-Base"},
                              "parallel": {"strategy": "auto"}}})
    resolved, decision = resolve_parallel(cfg, standalone=False, gpus=None)
    assert Layout.from_config(resolved.train.parallel, 16, 8) == decision.chosen.layout


def test_one_spec_for_the_planner_and_the_model():
    init = ModelConfig.model_validate({"init": {"hidden_size": 64, "num_attention_heads": 4}, "variant": "baichuan-13b"})
    spec = from_model_config(init, vocab_size=300)
    assert (spec.position, spec.norm_head, spec.vocab_size) == ("alibi", False, 300)
    auto = from_model_config(ModelConfig.model_validate({"init": {}}), vocab_size=300)
    assert (auto.position, auto.norm_head) == ("rope", True)  # init + auto = Baichuan2-7B's layout
    hub = VARIANTS["baichuan2-13b"].to_hf_dict()
    pretrained = from_model_config(ModelConfig.model_validate({"name_or_path": "x", "position": "rope",
                                                               "z_loss_weight": 1e-3}), hf_config=hub)
    assert (pretrained.position, pretrained.norm_head, pretrained.z_loss_weight) == ("rope", True, 1e-3)
    # FLOPs per token: the one definition (torchtitan's: no FLOPs for the embedding lookup).
    m = VARIANTS["baichuan2-7b"]
    assert m.flops_per_token(2048) == 6 * (m.num_params - m.embed_params) + 12 * 32 * 4096 * 2048
    with pytest.raises(ConfigError, match="vocabulary size"):
        from_model_config(ModelConfig.model_validate({"init": {}}))
    with pytest.raises(ValueError):
        BaichuanConfig(300, 64, 128, 2, 5)
