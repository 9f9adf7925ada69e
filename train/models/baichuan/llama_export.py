"""`checkpoint.export_format: llama`: the RoPE Baichuans (Baichuan-7B, Baichuan2-7B) written as a
stock `LlamaForCausalLM`, which the transformers this project installs loads without
`trust_remote_code` (the published remote code runs only on transformers 4.33–4.40).

A RoPE Baichuan is a Llama up to two details, both resolved here:

* `W_pack` is one Linear(h, 3h) whose output rows are [Q; K; V]: split into `q_proj`, `k_proj`,
  `v_proj` (RoPE's rotate_half layout is already Llama's, so no row permutation is needed).
* Baichuan2's NormHead L2-normalises the head's rows in every forward: the rows are written
  normalised, so a plain Linear head gives the same logits.

The tokenizer is the SentencePiece `tokenizer.model` with a `tokenizer_config.json` for
transformers' `LlamaTokenizer`: no BOS/EOS added (as training encodes), the dummy prefix as the
model file says, `<unk>`/`<s>`/`</s>` = 0/1/2 and `<unk>` as pad. ALiBi (the 13B models) has no
Llama equivalent and is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from job.baichuan import BOS_ID, EOS_ID, PAD_ID, BaichuanConfig

#: transformers releases that load the llama layout without remote code (LlamaForCausalLM with
#: `head_dim` in its config, and the tokenizer's `add_prefix_space`), as the README tells users.
LLAMA_TRANSFORMERS = ">= 4.41 (tested with the 5.x this project installs)"


def check_supported(cfg: BaichuanConfig) -> None:
    if cfg.position != "rope":
        raise ValueError("checkpoint.export_format llama needs a RoPE model (Baichuan-7B, Baichuan2-7B); this one "
                         "uses ALiBi (the 13B models), which Llama cannot express: use export_format baichuan")


def llama_config(cfg: BaichuanConfig, torch_dtype: str) -> dict:
    """`config.json` of a `LlamaForCausalLM` with this model's shapes (multi-head attention:
    as many key/value heads as heads)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        # Where it came from, so the project's own loader rebuilds the same variant (z-loss for eval).
        "baichuan": {"norm_head": cfg.norm_head, "z_loss_weight": cfg.z_loss_weight},
    }


def to_llama_state(state: Mapping[str, torch.Tensor], cfg: BaichuanConfig) -> dict[str, torch.Tensor]:
    """Published Baichuan names → Llama names; W_pack split, a NormHead's rows normalised (in fp32)."""
    check_supported(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("self_attn.W_pack.weight"):
            prefix = name[: -len("W_pack.weight")]
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[f"{prefix}{part}.weight"] = piece.clone()  # its own storage, as safetensors wants
        elif name == "lm_head.weight" and cfg.norm_head:
            out[name] = F.normalize(t.float(), dim=-1).to(t.dtype)
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        else:
            out[name] = t
    return out


def from_llama_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_llama_state` (a normalised head stays normalised: NormHead is idempotent)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            prefix = name[: -len("q_proj.weight")]
            out[f"{prefix}W_pack.weight"] = torch.cat(
                [state[f"{prefix}{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")], dim=0)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        else:
            out[name] = t
    return out


def baichuan_config_of(hf: dict) -> BaichuanConfig:
    """The BaichuanConfig of a llama-layout export's config.json."""
    origin = hf.get("baichuan") or {}
    return BaichuanConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]), num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=int(hf["num_attention_heads"]), position="rope",
        norm_head=bool(origin.get("norm_head", False)), z_loss_weight=float(origin.get("z_loss_weight", 0.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=float(hf.get("rope_theta", 10000.0)), initializer_range=float(hf.get("initializer_range", 0.02)))


def tokenizer_config(tokenizer_file: str | os.PathLike[str], cfg: BaichuanConfig) -> dict:
    """`tokenizer_config.json` for transformers' LlamaTokenizer reading our tokenizer.model with
    the same ids as SentencePiece: the dummy prefix only if the model file adds one."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_file).read_bytes())
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix),
        "legacy": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
    }


def readme(cfg: BaichuanConfig) -> str:
    return f"""# Fine-tuned {'Baichuan2' if cfg.norm_head else 'Baichuan'}-7B-shaped model, llama layout

Written by mlaunch (`checkpoint.export_format: llama`): the weights as a stock `LlamaForCausalLM`
(W_pack split into q/k/v_proj{', the NormHead rows pre-normalised' if cfg.norm_head else ''}), so
transformers {LLAMA_TRANSFORMERS} loads it without remote code:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")  # the SentencePiece ids of training
```

Prompts: the training template up to `{{response}}`, no BOS (training added none). Or, with no
transformers at all: `mlaunch generate <this folder or the run's output_dir> --prompt "..."`.
"""


def save_llama_state_dict(state: Mapping[str, torch.Tensor], cfg: BaichuanConfig, out_dir: str | os.PathLike[str], *,
                          max_shard_size_bytes: int, tokenizer_file: str | os.PathLike[str] | None = None) -> Path:
    """Export a full Baichuan state dict (published names) in the llama layout, atomically."""
    from train.models.baichuan.hub import _cpu_contiguous, _write_atomically, _write_json, write_safetensors

    tensors = _cpu_contiguous(to_llama_state(state, cfg))
    if not tensors:
        raise ValueError("refusing to export an empty state dict")
    torch_dtype = str(tensors["lm_head.weight"].dtype).removeprefix("torch.")
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise FileNotFoundError(f"tokenizer file does not exist: {tokenizer_file}")

    def write(tmp: Path) -> None:
        write_safetensors(tmp, tensors, max_shard_size_bytes)
        _write_json(tmp / "config.json", llama_config(cfg, torch_dtype))
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
            _write_json(tmp / "tokenizer_config.json", tokenizer_config(tokenizer_file, cfg))
            _write_json(tmp / "special_tokens_map.json",
                        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
        (tmp / "README.md").write_text(readme(cfg))

    return _write_atomically(Path(out_dir), write)


def load_llama_export(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32):
    """(the project's BaichuanForCausalLM, its config) from a llama-layout export."""
    from train.models.baichuan.hub import build_empty_model, iter_checkpoint_tensors

    hf = json.loads((Path(folder) / "config.json").read_text())
    cfg = baichuan_config_of(hf)
    model = build_empty_model(cfg, dtype=dtype, device=device)
    state = from_llama_state(dict(iter_checkpoint_tensors(folder)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"llama export {folder} does not match its config.json: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return model, cfg
