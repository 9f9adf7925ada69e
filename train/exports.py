"""Finding and loading what a run made, for `mlaunch generate` and `mlaunch eval`.

A target is a run's output directory (its resolved `config.yaml` and its `export/`), an export
folder itself (`<output_dir>/export`: the hub layout with config.json, the llama layout, or a LoRA
adapter folder with adapter_config.json), or — for eval only — a job YAML whose `train.model` is the
base model to measure. The run's config gives the prompt template and the held-out split.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from job.config import JobConfig, load_config
from job.errors import ConfigError, MlaunchError

RUN_CONFIG = "config.yaml"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Target:
    """Where the weights are and which training config goes with them."""

    given: Path
    export_dir: Path | None  # None: a job YAML's base model (`train.model`)
    config_file: Path | None  # the run's resolved config.yaml, or the job YAML; None when unknown

    @property
    def is_adapter(self) -> bool:
        return self.export_dir is not None and (self.export_dir / ADAPTER_CONFIG).is_file()


def _is_export(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()


def find_target(path: Path, *, allow_job_yaml: bool = False) -> Target:
    """The target `path` names, or a one-line ConfigError saying what to pass instead."""
    path = Path(path).expanduser()
    what = "a run's output_dir or its export folder" + (" or a job YAML" if allow_job_yaml else "")
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass {what}")
    if path.is_file():
        if allow_job_yaml and path.suffix in (".yaml", ".yml"):
            return Target(path, None, path)
        raise ConfigError(f"{path} is a file, not {what}")
    if (path / RUN_CONFIG).is_file():  # a run directory
        export = path / "export"
        if not _is_export(export):
            raise ConfigError(f"{path} is a run directory without an export ({export} has no config.json or "
                              f"{ADAPTER_CONFIG}); let the run finish with train.checkpoint.export: true")
        return Target(path, export, path / RUN_CONFIG)
    if _is_export(path):
        # The run's config beside the export, else the copy a LoRA export carries inside.
        configs = [c for c in (path.parent / RUN_CONFIG, path / "train_config.yaml") if c.is_file()]
        return Target(path, path, configs[0] if configs else None)
    raise ConfigError(f"{path} is not an export (no config.json or {ADAPTER_CONFIG}) nor a run directory "
                      f"(no {RUN_CONFIG}); pass {what}")


def read_job(target: Target) -> JobConfig | None:
    return load_config(target.config_file) if target.config_file is not None else None


def pick_device(name: str) -> tuple[torch.device, torch.dtype]:
    """`auto`: CUDA in bf16 when there is a GPU, else CPU in fp32 (CPU bf16 matmuls are slow)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {name}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_model(target: Target, job: JobConfig | None, device: torch.device, dtype: torch.dtype,
               vocab_size: int | None = None):
    """(model in eval mode, its BaichuanConfig, the tokenizer.model the weights came with or None)."""
    from job.baichuan import from_model_config, read_config_json

    if target.export_dir is None:  # a job YAML: the base model as training would build it
        assert job is not None
        from train.build import build_model, model_dir_of

        model_dir = model_dir_of(job.train)
        if model_dir is None:  # model.init: the seeded weights the run started from (built on CPU)
            model, mcfg, _ = build_model(job.train, vocab_size or 0, None, device)
            return model.to(dtype).eval(), mcfg, None
        from train.models.baichuan.hub import build_empty_model, load_weights_into

        try:  # straight into `dtype`: a 13B base never exists in fp32 on the GPU
            mcfg = from_model_config(job.train.model, hf_config=read_config_json(model_dir))
            model = build_empty_model(mcfg, dtype=dtype, device=device)
            load_weights_into(model, model_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"train.model.name_or_path: {e}") from None
        tok = model_dir / "tokenizer.model"
        return model.eval(), mcfg, tok if tok.is_file() else None
    export = target.export_dir
    if target.is_adapter:
        try:
            from train.lora import load_for_inference
        except ImportError as e:
            raise ConfigError(f"{export} is a LoRA adapter export but train.lora cannot be imported ({e}); "
                              "install peft") from None
        model, tok, _ = load_for_inference(export, device, dtype)
        return model.eval(), model.config, tok
    try:
        hf = read_config_json(export)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{export}: {e}") from None
    tok = export / "tokenizer.model"
    tok = tok if tok.is_file() else None
    if hf.get("model_type") == "llama":
        from train.models.baichuan.llama_export import load_llama_export

        model, mcfg = load_llama_export(export, device=device, dtype=dtype)
        return model.eval(), mcfg, tok
    from train.models.baichuan.hub import build_empty_model, load_weights_into

    try:
        # The run's overrides (position, norm_head) when known, as it built the model; else the
        # tell-tales of config.json, which our own exports always carry.
        if job is not None:
            mcfg = from_model_config(job.train.model.model_copy(update={"init": None, "name_or_path": str(export)}),
                                     hf_config=hf)
        else:
            from job.baichuan import BaichuanConfig

            mcfg = BaichuanConfig.from_hf_dict(hf)
        model = build_empty_model(mcfg, dtype=dtype, device=device)
        load_weights_into(model, export)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{export}: {e}") from None
    return model.eval(), mcfg, tok


def tokenizer_file(target: Target, job: JobConfig | None, from_weights: Path | None) -> Path:
    """The tokenizer.model that goes with the weights: the export's own, else the one the run used."""
    if from_weights is not None:
        return from_weights
    if job is None:
        raise ConfigError(f"{target.given}: no tokenizer.model in the export and no run config.yaml beside it; "
                          "pass the run's output_dir")
    from train.build import model_dir_of
    from train.tokenizer import ensure_tokenizer

    cache = Path(job.train.output_dir) / "cache"
    if target.config_file is not None and target.config_file.name == RUN_CONFIG:
        cache = target.config_file.parent / "cache"
    return ensure_tokenizer(job.train, model_dir_of(job.train), cache, local_rank=0, barrier=lambda: None)


def describe(target: Target) -> str:
    if target.export_dir is None:
        return f"base model of {target.given}"
    kind = "LoRA adapter" if target.is_adapter else (
        "llama-layout export" if _model_type(target.export_dir) == "llama" else "export")
    return f"{kind} {target.export_dir}"


def _model_type(export: Path) -> str | None:
    try:
        return json.loads((export / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def run_command(call: Callable[[], Any]) -> int:
    """`python -m train.generate / train.evaluate`: a user's mistake is one line and its exit
    code (`mlaunch generate` shows the child's line as its own), a traceback only with MLAUNCH_DEBUG=1."""
    try:
        call()
    except MlaunchError as e:
        if os.environ.get("MLAUNCH_DEBUG") == "1":
            raise
        print(f"mlaunch: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
