"""Hub checkpoints: the four published layouts, config tell-tales, export round trips."""

from __future__ import annotations

import json

import pytest
import torch

from job.baichuan import BaichuanConfig
from train.models.baichuan.model import BaichuanForCausalLM, init_weights
from train.models.baichuan.hub import (
    load_pretrained,
    load_weights_into,
    resolve_checkpoint_dir,
    save_pretrained,
    save_state_dict,
    write_hub_checkpoint,
)

FORMATS = ["bin", "bin-sharded", "safetensors", "safetensors-sharded"]


def tiny(position="rope", norm_head=False, seed=0):
    torch.manual_seed(seed)
    cfg = BaichuanConfig(300, 64, 96, 2, 4, position=position, norm_head=norm_head)
    model = BaichuanForCausalLM(cfg)
    init_weights(model, 0.05)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model, cfg


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------------------
# Published layouts
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("position,norm_head", [("rope", False), ("alibi", True)])
def test_every_published_layout_loads_identically(tmp_path, fmt, position, norm_head):
    model, cfg = tiny(position, norm_head)
    write_hub_checkpoint(model, cfg, tmp_path, fmt)
    if fmt.endswith("sharded"):
        index = next(tmp_path.glob("*.index.json"))
        assert len(set(json.loads(index.read_text())["weight_map"].values())) == 2
    # No overrides: the written config.json alone must identify the variant.
    loaded, loaded_cfg = load_pretrained(tmp_path)
    assert loaded_cfg == cfg
    assert_same_weights(loaded, model)
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model.eval()(ids))


def test_rope_bin_checkpoint_carries_inv_freq_and_it_is_ignored(tmp_path):
    model, cfg = tiny("rope")
    write_hub_checkpoint(model, cfg, tmp_path, "bin")
    raw = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in raw
    loaded, _ = load_pretrained(tmp_path)
    assert not any("inv_freq" in k for k in loaded.state_dict())


def test_load_in_bf16_allocates_in_bf16(tmp_path):
    model, cfg = tiny("alibi")
    write_hub_checkpoint(model, cfg, tmp_path, "safetensors")
    loaded, _ = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16())


# --------------------------------------------------------------------------------------
# config.json tell-tales (minimal versions of the four published configs)
# --------------------------------------------------------------------------------------
def _published(hidden, ffn, layers, heads, vocab, **extra):
    d = {
        "architectures": ["BaichuanForCausalLM"],
        "model_type": "baichuan",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    d.update(extra)
    return d


PUBLISHED = {
    "baichuan-7b": _published(4096, 11008, 32, 32, 64000, max_position_embeddings=4096),
    "baichuan-13b": _published(
        5120, 13696, 40, 40, 64000, model_max_length=4096, gradient_checkpointing=[False]
    ),
    "baichuan2-7b": _published(
        4096, 11008, 32, 32, 125696, max_position_embeddings=4096, model_max_length=4096, z_loss_weight=0
    ),
    "baichuan2-13b": _published(
        5120, 13696, 40, 40, 125696, model_max_length=4096, z_loss_weight=0, gradient_checkpointing=[False]
    ),
}


@pytest.mark.parametrize(
    "name,position,norm_head",
    [
        ("baichuan-7b", "rope", False),
        ("baichuan-13b", "alibi", False),
        ("baichuan2-7b", "rope", True),
        ("baichuan2-13b", "alibi", True),
    ],
)
def test_from_hf_dict_reads_tell_tales(name, position, norm_head):
    from job.baichuan import VARIANTS

    cfg = BaichuanConfig.from_hf_dict(PUBLISHED[name])
    assert (cfg.position, cfg.norm_head) == (position, norm_head)
    assert cfg == VARIANTS[name]
    # Our export reads back as the same variant.
    assert BaichuanConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_from_hf_dict_vocab_alone_marks_baichuan2_and_overrides_win():
    d = _published(64, 96, 2, 4, 125696, model_max_length=64)
    assert BaichuanConfig.from_hf_dict(d).norm_head
    tiny_d = _published(64, 96, 2, 4, 300)
    cfg = BaichuanConfig.from_hf_dict(tiny_d, position="rope", norm_head=True)
    assert (cfg.position, cfg.norm_head) == ("rope", True)
    cfg = BaichuanConfig.from_hf_dict(PUBLISHED["baichuan2-13b"], position="rope", norm_head=False)
    assert (cfg.position, cfg.norm_head) == ("rope", False)


def test_to_hf_dict_published_shape():
    d = BaichuanConfig(300, 64, 96, 2, 4, position="alibi", norm_head=True).to_hf_dict(torch.bfloat16)
    assert d["model_type"] == "baichuan"
    assert d["architectures"] == ["BaichuanForCausalLM"]
    assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (1, 2, 0)
    assert d["torch_dtype"] == "bfloat16"
    assert "max_position_embeddings" not in d and d["model_max_length"] == 4096
    assert d["z_loss_weight"] == 0.0
    v1 = BaichuanConfig(300, 64, 96, 2, 4, position="rope").to_hf_dict()
    assert "z_loss_weight" not in v1 and "max_position_embeddings" in v1


def test_from_hf_dict_missing_key_is_a_clear_error():
    d = dict(PUBLISHED["baichuan-7b"])
    del d["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        BaichuanConfig.from_hf_dict(d)


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_is_bit_identical(tmp_path, dtype):
    model, cfg = tiny("alibi", norm_head=True)
    model = model.to(dtype)
    tok = tmp_path / "src.model"
    tok.write_bytes(b"not really a tokenizer")
    out = save_pretrained(model, cfg, tmp_path / "export", tokenizer_file=tok)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).split(".")[1]
    loaded, loaded_cfg = load_pretrained(out, dtype=dtype)
    assert loaded_cfg == cfg
    assert_same_weights(loaded, model)
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    # No temp dirs left beside the export.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "src.model"]


def test_sharding_above_limit_writes_a_correct_index(tmp_path):
    model, cfg = tiny("rope")
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    limit = 40_000  # each layer ≈ 90 kB, embedding and head ≈ 77 kB: every tensor group splits
    out = save_state_dict(state, cfg, tmp_path / "sharded", max_shard_size_bytes=limit)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(state)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()

    from safetensors import safe_open

    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * 4 for k in keys)
        assert all(index["weight_map"][k] == shard for k in keys)
        assert size <= limit or len(keys) == 1  # a lone tensor above the limit is allowed

    loaded, _ = load_pretrained(out)
    assert_same_weights(loaded, model)

    # Below the limit: a single file, no index.
    single = save_state_dict(state, cfg, tmp_path / "single", max_shard_size_bytes=total)
    assert sorted(p.name for p in single.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_export_replaces_an_existing_directory(tmp_path):
    model, cfg = tiny("rope")
    out = tmp_path / "export"
    save_state_dict(model.state_dict(), cfg, out, max_shard_size_bytes=40_000)
    other, _ = tiny("rope", seed=1)
    save_pretrained(other, cfg, out)
    assert not (out / "model.safetensors.index.json").exists()  # no stale files mixed in
    assert_same_weights(load_pretrained(out)[0], other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_failed_export_leaves_nothing_behind(tmp_path):
    model, cfg = tiny("rope")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        save_pretrained(model, cfg, tmp_path / "export", tokenizer_file=tmp_path / "missing.model")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# Errors and partial loads
# --------------------------------------------------------------------------------------
def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        resolve_checkpoint_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_pretrained(tmp_path / "nope")


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="baichuan-inc/not-here"):
        resolve_checkpoint_dir("baichuan-inc/not-here")


def test_missing_files_are_clear_errors(tmp_path):
    model, cfg = tiny("rope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "empty")

    ckpt = write_hub_checkpoint(model, cfg, tmp_path / "noweights", "safetensors")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_pretrained(ckpt)

    ckpt = write_hub_checkpoint(model, cfg, tmp_path / "lostshard", "bin-sharded")
    (ckpt / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00002.bin"):
        load_pretrained(ckpt)


def test_key_and_shape_mismatches_are_reported(tmp_path):
    model, cfg = tiny("rope")
    state = model.state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_state_dict(state, cfg, tmp_path / "bad")
    expected = r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight.*unexpected keys: model\.layers\.1\.mlp\.extra"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(tmp_path / "bad")

    write_hub_checkpoint(model, cfg, tmp_path / "ok", "safetensors")
    with pytest.raises(ValueError, match="shape mismatch"):
        wider = BaichuanForCausalLM(BaichuanConfig(300, 64, 128, 2, 4))
        load_weights_into(wider, tmp_path / "ok")


def test_pipeline_stage_loads_only_its_keys(tmp_path):
    model, cfg = tiny("alibi")
    write_hub_checkpoint(model, cfg, tmp_path, "safetensors-sharded")
    stage = BaichuanForCausalLM(cfg)
    stage.model.embed_tokens = None
    del stage.model.layers["0"]
    with pytest.raises(ValueError, match="unexpected keys"):
        load_weights_into(stage, tmp_path)
    load_weights_into(stage, tmp_path, allow_unexpected=True)
    full = model.state_dict()
    for k, v in stage.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_export_accepts_views_and_tied_tensors(tmp_path):
    model, cfg = tiny("rope")
    state = dict(model.state_dict())
    flat = torch.cat([state["model.norm.weight"], state["model.layers.0.input_layernorm.weight"]])
    state["model.norm.weight"] = flat[:64]  # a view into a shared buffer, as gathers produce
    state["model.layers.0.input_layernorm.weight"] = flat[64:]
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # shared storage
    out = save_state_dict(state, cfg, tmp_path / "export")
    loaded, _ = load_pretrained(out)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name,repo,prefix", [
    ("baichuan-7b", "baichuan-inc/Baichuan-7B", "BaiChuan"),
    ("baichuan-13b", "baichuan-inc/Baichuan-13B-Base", "Baichuan"),
    ("baichuan2-7b", "baichuan-inc/Baichuan2-7B-Base", "Baichuan"),
    ("baichuan2-13b", "baichuan-inc/Baichuan2-13B-Base", "Baichuan"),
])
def test_export_points_at_the_published_remote_code(name: str, repo: str, prefix: str) -> None:
    """An export's config.json and tokenizer_config.json name the published code by hub repo, so
    `from_pretrained(export, trust_remote_code=True)` runs it; the variant still reads back."""
    from job.baichuan import VARIANTS

    cfg = VARIANTS[name]
    d = cfg.to_hf_dict()
    assert d["architectures"] == [f"{prefix}ForCausalLM"]
    assert d["auto_map"]["AutoModelForCausalLM"] == f"{repo}--modeling_baichuan.{prefix}ForCausalLM"
    assert d["auto_map"]["AutoConfig"] == f"{repo}--configuration_baichuan.{prefix}Config"
    assert cfg.tokenizer_config()["auto_map"]["AutoTokenizer"][0] == f"{repo}--tokenization_baichuan.{prefix}Tokenizer"
    back = BaichuanConfig.from_hf_dict(d)
    assert (back.position, back.norm_head, back.hidden_size) == (cfg.position, cfg.norm_head, cfg.hidden_size)
