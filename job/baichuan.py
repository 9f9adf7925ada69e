"""The Baichuan family, torch-free: the one description the planner and the model share.

`BaichuanConfig` is the architecture in `config.json`'s own words (`hidden_size`,
`num_hidden_layers`, …): the variant table, reading a published `config.json` (and writing one),
parameter shapes and counts, FLOPs per token. The torch modules (train/models/baichuan/) are built
from it; the planner (job/planner/) does its arithmetic on it. Nothing here imports torch.

Token ids (SentencePiece `tokenizer.model`): `<unk>` = 0, also used as padding; `<s>` = 1;
`</s>` = 2. `IGNORE_INDEX` is torch's cross-entropy default: labels set to it carry no loss.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal

from job.errors import ConfigError

if TYPE_CHECKING:
    from job.config import ModelConfig

UNK_ID = 0
PAD_ID = UNK_ID  # Baichuan pads with <unk>
BOS_ID = 1
EOS_ID = 2
IGNORE_INDEX = -100

Position = Literal["rope", "alibi"]
VariantName = Literal["baichuan-7b", "baichuan-13b", "baichuan2-7b", "baichuan2-13b"]
BAICHUAN2_VOCAB_SIZE = 125696


@dataclass(frozen=True)
class BaichuanConfig:
    """Architecture of one Baichuan model; `position`/`norm_head` select the variant.

    Frozen (and so hashable): the planner caches layer splits per model, and a spec that could
    change under the model built from it would be a bug. `dataclasses.replace` makes variants."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    position: Position = "rope"
    norm_head: bool = False  # Baichuan2: lm_head rows L2-normalised in every forward
    z_loss_weight: float = 0.0  # Baichuan2 auxiliary loss on logsumexp^2; 0 = off
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.position not in ("rope", "alibi"):
            raise ValueError(f"position must be 'rope' or 'alibi', got {self.position!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ---------------------------------------------------------------- parameters
    @property
    def layer_params(self) -> int:
        """W_pack (3h²) + o_proj (h²) + SwiGLU gate/up/down (3·h·ffn) + two RMSNorm weights (2h)."""
        h = self.hidden_size
        return 4 * h * h + 3 * h * self.intermediate_size + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Final RMSNorm (h) plus the untied lm_head (V·h): they always travel together."""
        return self.hidden_size + self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Exact parameter count of the full model (embedding and untied head both counted)."""
        return self.embed_params + self.num_hidden_layers * self.layer_params + self.head_params

    def param_shapes(self, layers: Iterable[int] | None = None, first: bool = True,
                     last: bool = True) -> list[tuple[str, tuple[int, ...]]]:
        """(published name, shape) of every parameter; a pipeline stage passes its layers and
        whether it is the first (embeddings) or the last (norm + head) stage."""
        h, f = self.hidden_size, self.intermediate_size
        shapes: list[tuple[str, tuple[int, ...]]] = []
        if first:
            shapes.append(("model.embed_tokens.weight", (self.vocab_size, h)))
        for i in range(self.num_hidden_layers) if layers is None else layers:
            p = f"model.layers.{i}."
            shapes += [
                (p + "self_attn.W_pack.weight", (3 * h, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)),
                (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        if last:
            shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return shapes

    # ---------------------------------------------------------------- LoRA adapters
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each decoder layer's Linear, by module name: the modules
        LoRA can target (the head is left out: NormHead normalises its rows, which a merged
        update would change)."""
        h, f = self.hidden_size, self.intermediate_size
        return {"W_pack": (3 * h, h), "o_proj": (h, h), "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}

    def lora_shapes(self, r: int, target_modules: Iterable[str],
                    layers: Iterable[int] | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every adapter tensor, as peft saves them: per target Linear(in, out),
        `lora_A` (r × in) and `lora_B` (out × r)."""
        linears = self.linear_shapes()
        targets = list(dict.fromkeys(target_modules))
        unknown = [t for t in targets if t not in linears]
        if unknown:
            raise ValueError(f"LoRA target module(s) {', '.join(unknown)} not in the model; "
                             f"its linear layers are {', '.join(linears)}")
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for i in range(self.num_hidden_layers) if layers is None else layers:
            for name in linears:  # the model's own order, whatever order the config lists them in
                if name in targets:
                    out_f, in_f = linears[name]
                    p = f"model.layers.{i}.{'self_attn' if name in ('W_pack', 'o_proj') else 'mlp'}.{name}."
                    shapes += [(p + "lora_A.weight", (r, in_f)), (p + "lora_B.weight", (out_f, r))]
        return shapes

    def lora_params(self, r: int, target_modules: Iterable[str]) -> int:
        """Adapter parameters: r · (in + out) per target Linear, in every layer."""
        return sum(a * b for _, (a, b) in self.lora_shapes(r, target_modules))

    def linear_params(self, layers: Iterable[int] | None = None) -> int:
        """Elements of the decoder layers' Linear weights (what QLoRA stores in 4 bits)."""
        n = self.num_hidden_layers if layers is None else len(list(layers))
        return n * sum(a * b for a, b in self.linear_shapes().values())

    # ---------------------------------------------------------------- FLOPs
    def layer_flops_per_token(self, seq_len: int) -> int:
        """Forward + backward matmul FLOPs of one decoder layer for one token: 6 × its params +
        12·h·s for the attention scores (PaLM, appendix B; the full s×s matrix, as PaLM counts,
        although causal kernels skip half of it)."""
        return 6 * self.layer_params + 12 * self.hidden_size * seq_len

    @property
    def head_flops_per_token(self) -> int:
        """The lm_head matmul (and the final norm's weight, a rounding error), forward + backward."""
        return 6 * self.head_params

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, 6·N + 12·L·h·s with N *excluding the input embedding* (a
        lookup, no matmul): torchtitan's convention, so MFU figures compare with theirs. This is
        the project's one definition: the planner's step times and every MFU printed use it."""
        return self.num_hidden_layers * self.layer_flops_per_token(seq_len) + self.head_flops_per_token

    # ---------------------------------------------------------------- config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], position: Position | None = None,
                     norm_head: bool | None = None) -> "BaichuanConfig":
        """Build from a published `config.json` dict.

        The variant is read from the tell-tales the published configs carry (Baichuan2: a
        `z_loss_weight` key or vocab 125,696; RoPE: `max_position_embeddings`, ALiBi has only
        `model_max_length`). Explicit arguments win, because tiny test models carry neither
        tell-tale vocab nor a meaningful key set."""
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"config.json lacks required key(s): {', '.join(missing)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act {act!r} is not supported (Baichuan uses 'silu')")
        if position is None:
            position = "rope" if "max_position_embeddings" in d else "alibi"
        if norm_head is None:
            norm_head = "z_loss_weight" in d or d["vocab_size"] == BAICHUAN2_VOCAB_SIZE
        max_pos = d.get("max_position_embeddings", d.get("model_max_length", 4096))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            position=position,
            norm_head=bool(norm_head),
            z_loss_weight=float(d.get("z_loss_weight", 0.0) or 0.0),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(max_pos),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )

    def to_hf_dict(self, torch_dtype: Any = "bfloat16") -> dict[str, Any]:
        """A `config.json` dict in the published layout; `from_hf_dict` reads it back to the same
        variant without overrides (the key set is the tell-tale). `torch_dtype` is a name or a
        `torch.dtype` (written by name: this module does not import torch)."""
        torch_dtype = str(torch_dtype).removeprefix("torch.")
        repo, prefix = self.published_code()
        d: dict[str, Any] = {
            "architectures": [f"{prefix}ForCausalLM"],
            # The published remote code, referenced in its hub repo: an export loads with
            # `AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)`.
            "auto_map": {"AutoConfig": f"{repo}--configuration_baichuan.{prefix}Config",
                         "AutoModelForCausalLM": f"{repo}--modeling_baichuan.{prefix}ForCausalLM"},
            "model_type": "baichuan",
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if self.position == "rope":
            d["max_position_embeddings"] = self.max_position_embeddings
            if self.norm_head:  # Baichuan2-7B carries both keys
                d["model_max_length"] = self.max_position_embeddings
            if self.rope_theta != 10000.0:  # published code hard-codes 10000
                d["rope_theta"] = self.rope_theta
        else:
            d["model_max_length"] = self.max_position_embeddings
        if self.norm_head:
            d["z_loss_weight"] = self.z_loss_weight
        return d

    def published_code(self) -> tuple[str, str]:
        """(hub repo holding the remote code for this variant, its class-name prefix). Baichuan-7B's
        code spells its classes `BaiChuan…`; the later releases `Baichuan…`."""
        if self.norm_head:
            return ("baichuan-inc/Baichuan2-7B-Base" if self.position == "rope" else "baichuan-inc/Baichuan2-13B-Base"), "Baichuan"
        if self.position == "rope":
            return "baichuan-inc/Baichuan-7B", "BaiChuan"
        return "baichuan-inc/Baichuan-13B-Base", "Baichuan"

    def tokenizer_config(self) -> dict[str, Any]:
        """`tokenizer_config.json` for an export: the published SentencePiece tokenizer class, no
        BOS/EOS added by the tokenizer (the model's own data pipeline appends EOS)."""
        repo, prefix = self.published_code()
        return {
            "auto_map": {"AutoTokenizer": [f"{repo}--tokenization_baichuan.{prefix}Tokenizer", None]},
            "tokenizer_class": f"{prefix}Tokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<unk>",
            "model_max_length": self.max_position_embeddings,
        }


# The published shapes (Baichuan's config.json files and the Baichuan 2 report).
VARIANTS: dict[str, BaichuanConfig] = {
    "baichuan-7b": BaichuanConfig(64000, 4096, 11008, 32, 32, position="rope"),
    "baichuan-13b": BaichuanConfig(64000, 5120, 13696, 40, 40, position="alibi"),
    "baichuan2-7b": BaichuanConfig(BAICHUAN2_VOCAB_SIZE, 4096, 11008, 32, 32, position="rope", norm_head=True),
    "baichuan2-13b": BaichuanConfig(BAICHUAN2_VOCAB_SIZE, 5120, 13696, 40, 40, position="alibi", norm_head=True),
}
assert set(VARIANTS) == set(VariantName.__args__)  # type: ignore[attr-defined]

_HUB_NAME = re.compile(r"baichuan(2?)-(7|13)b")


def variant(name: str, **overrides: Any) -> BaichuanConfig:
    """`VARIANTS[name]` with fields replaced (e.g. `num_hidden_layers=2`)."""
    try:
        base = VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown Baichuan variant {name!r}; known: {', '.join(VARIANTS)}") from None
    return replace(base, **overrides)


def by_name(name: str) -> BaichuanConfig:
    """Map a hub id or local path ("baichuan-inc/Baichuan2-13B-Base", "Baichuan-13B-Chat",
    "/models/baichuan2-7b-chat") to the published variant, case-insensitively."""
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    match = _HUB_NAME.search(base)
    if not match:
        raise ConfigError(
            f"unknown model {name!r}: known variants are {', '.join(VARIANTS)} (any hub name that "
            "contains one of them); give the model's config.json for anything else"
        )
    return VARIANTS[f"baichuan{match.group(1)}-{match.group(2)}b"]


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """The `config.json` of a checkpoint folder, as a dict (the one reader of that file)."""
    path = Path(model_dir).expanduser() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {model_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def from_model_config(m: "ModelConfig", *, vocab_size: int | None = None,
                      hf_config: dict[str, Any] | None = None) -> BaichuanConfig:
    """The architecture `train.model` describes — the one place the YAML's overrides (`variant`,
    `position`, `norm_head`, `z_loss_weight`) meet `model.init` or a checkpoint's config.json.

    `hf_config` is the checkpoint's config.json (required when `m.init` is unset); `vocab_size`
    the tokenizer's size for `model.init` models without an explicit `init.vocab_size`."""
    layout = VARIANTS.get(m.variant)
    position = (layout.position if layout else None) if m.position == "auto" else m.position
    norm_head = (layout.norm_head if layout else None) if m.norm_head is None else m.norm_head
    if m.init is None:
        assert hf_config is not None, "a pretrained model needs its config.json"
        cfg = BaichuanConfig.from_hf_dict(hf_config, position=position, norm_head=norm_head)
        return cfg if m.z_loss_weight is None else replace(cfg, z_loss_weight=m.z_loss_weight)
    i = m.init
    vocab = i.vocab_size or vocab_size
    if vocab is None:
        raise ConfigError("train.model.init: the vocabulary size is unknown; set init.vocab_size")
    return BaichuanConfig(
        vocab_size=vocab, hidden_size=i.hidden_size, intermediate_size=i.intermediate_size,
        num_hidden_layers=i.num_hidden_layers, num_attention_heads=i.num_attention_heads,
        # `init` with variant auto means Baichuan2-7B's layout (RoPE, NormHead).
        position=position or "rope", norm_head=True if norm_head is None else norm_head,
        z_loss_weight=m.z_loss_weight or 0.0, max_position_embeddings=i.max_position_embeddings,
        initializer_range=i.initializer_range,
    )
