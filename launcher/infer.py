"""`mlaunch generate` and `mlaunch eval`: try and measure what a run made. Thin commands over
train/generate.py and train/evaluate.py, run as `python -m train.generate|train.evaluate` in a
child process: the launcher never imports train/ (nor torch), so `mlaunch --help` stays instant.
The child streams to this terminal and prints its own one-line errors; its exit code is ours.
Register with `app.command("generate")(generate)` and `app.command("eval")(evaluate)`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from job.errors import ConfigError

_ROOT = Path(__file__).resolve().parents[1]


def _run_module(module: str, args: list[str]) -> None:
    path = os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)
    try:
        code = subprocess.call([sys.executable, "-m", module, *args], env={**os.environ, "PYTHONPATH": path})
    except KeyboardInterrupt:
        code = 130
    if code:
        raise typer.Exit(code)

_TARGET_HELP = ("A run's output_dir (its config.yaml and export/) or an export folder: the hub layout, the "
                "llama layout, or a LoRA adapter (adapter_config.json).")


def generate(
    target: Path = typer.Argument(..., help=_TARGET_HELP, show_default=False),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The customer's question (the template's {instruction})."),
    from_data: Optional[int] = typer.Option(None, "--from-data", min=1, metavar="N",
                                            help="Answer the first N held-out rows of the run's eval split, beside their reference answers."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Stop after this many new tokens (or at EOS)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy; above 0, sample from softmax(logits / T)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling: draw from the smallest set of tokens holding this much probability."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer instead of streamed text."),
    category: Optional[str] = typer.Option(None, "--category", help="The template's {category} (with --prompt)."),
    intent: Optional[str] = typer.Option(None, "--intent", help="The template's {intent} (with --prompt)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA in bf16 when present, else CPU in fp32), cpu or cuda."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole sequence every step instead of using the KV cache (slow; for comparison)."),
) -> None:
    """Answer a question with a fine-tuned model, in the training prompt's format, streamed token by token."""
    if (prompt is None) == (from_data is None):
        raise ConfigError("pass exactly one of --prompt TEXT and --from-data N")
    args = ["--max-new-tokens", str(max_new_tokens), "--temperature", repr(temperature),
            "--top-p", repr(top_p), "--seed", str(seed), "--device", device]
    for flag, value in (("--prompt", prompt), ("--from-data", from_data), ("--category", category),
                        ("--intent", intent)):
        if value is not None:
            args += [f"{flag}={value}"]  # `=`: a prompt starting with `-` stays a value
    args += ["--json"] * as_json + ["--no-cache"] * no_cache
    _run_module("train.generate", [*args, "--", str(target)])


def evaluate(
    target: Path = typer.Argument(..., help=_TARGET_HELP + " Or a job YAML: its base model (train.model).",
                                  show_default=False),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a line of text."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA in bf16 when present, else CPU in fp32), cpu or cuda."),
) -> None:
    """Loss and perplexity on the held-out split training used (run, export, or a job YAML's base model)."""
    _run_module("train.evaluate", ["--device", device] + ["--json"] * as_json + ["--", str(target)])
