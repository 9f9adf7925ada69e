"""Generation with a fine-tuned model: the training prompt, greedy or nucleus sampling, a KV
cache, EOS, the answer streamed as it is decoded. `mlaunch generate` (launcher/infer.py) is a thin
command over `run`.

The prompt is the training template's text up to `{response}` (`data.template` of the run's
config; the tutorial's when no config is known), encoded exactly as training encoded it (no BOS,
the prompt on its own), so the model continues where its training answers began.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from job.baichuan import EOS_ID
from job.config import TUTORIAL_TEMPLATE, TrainConfig
from job.errors import ConfigError
from train import exports


# ------------------------------------------------------------------------------ the token loop
def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next id from one position's logits [V]: argmax when `temperature` is 0, else a draw
    from softmax(logits / temperature) cut to the smallest set of ids holding `top_p` of the mass."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep an id while the mass before it is below top_p: the most likely id always stays.
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        sorted_p = sorted_p * keep
        return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, use_cache: bool = True, eos_id: int = EOS_ID) -> Iterator[int]:
    """Yield the new ids one at a time (EOS last, when the model says it). With `use_cache`, the
    prompt runs once and every later step feeds one token through `model.decode`; without it, every
    step runs the whole sequence through the training forward (the reference the cache must match)."""
    from train.models.baichuan.model import KVCache

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = KVCache(len(prompt_ids) + max_new_tokens) if use_cache else None
    step_input = ids
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = model.decode(step_input, cache)[0, -1]
        else:
            logits = model(ids)[0, -1]
        token = next_token(logits, temperature, top_p, generator)
        yield token
        if token == eos_id:
            return
        step_input = torch.tensor([[token]], dtype=torch.long, device=device)
        if cache is None:
            ids = torch.cat([ids, step_input], dim=1)


class StreamDecoder:
    """Text of the ids so far, handed out piece by piece. A character split over byte pieces
    (SentencePiece's byte fallback) decodes to U+FFFD until its last byte arrives: held back until then."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        return new

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return new


# ------------------------------------------------------------------------------ prompts and rows
def prompt_text(template: str, values: Mapping[str, str]) -> str:
    """The template's text up to `{response}` with `values` filled in; fields not given are empty."""
    from train.data import PromptTemplate

    t = PromptTemplate.parse(template)
    return t.prompt.format_map({f: values.get(f, "") for f in t.fields})


def held_out_rows(cfg: TrainConfig, n: int) -> list[tuple[int, dict[str, str]]]:
    """The first `n` rows of the eval split training used, as (row index after bad rows were
    dropped, {template field: value}): the same rows, the same seeded split."""
    from train.data import PromptTemplate, column_for, drop_bad_rows, load_rows, split_indices
    from train.data.sources import source_identity

    if cfg.data.eval_fraction <= 0:
        raise ConfigError("--from-data: the run has no held-out split (train.data.eval_fraction is 0); use --prompt")
    source, _, rows = source_identity(cfg.data)
    rows = load_rows(cfg.data) if rows is None else rows
    clean, _ = drop_bad_rows(rows, cfg.data, source, quiet=True)
    _, eval_idx = split_indices(len(clean), cfg.data.eval_fraction, cfg.seed)
    fields = PromptTemplate.parse(cfg.data.template).fields
    columns = {f: column_for(f, cfg.data, clean.column_names) for f in fields}
    picked = [int(i) for i in eval_idx[:n]]
    return [(i, {f: clean[i][c] for f, c in columns.items()}) for i in picked]


# ------------------------------------------------------------------------------ the command
@dataclass
class Generator:
    """A loaded model with its tokenizer and template: `answer` streams one prompt's reply."""

    model: Any
    tokenizer: Any
    template: str
    train_cfg: TrainConfig | None
    source: str

    @classmethod
    def load(cls, target: Path, device: str = "auto") -> "Generator":
        from train.tokenizer import BaichuanTokenizer

        t = exports.find_target(target)
        job = exports.read_job(t)
        dev, dtype = exports.pick_device(device)
        model, _, tok = exports.load_model(t, job, dev, dtype)
        if hasattr(model, "get_base_model"):  # a peft wrapper: the project's module, adapters inside
            model = model.get_base_model()
        tokenizer = BaichuanTokenizer(exports.tokenizer_file(t, job, tok))
        template = job.train.data.template if job is not None else TUTORIAL_TEMPLATE
        return cls(model, tokenizer, template, job.train if job is not None else None, exports.describe(t))

    def answer(self, values: Mapping[str, str], *, max_new_tokens: int, temperature: float, top_p: float,
               seed: int, use_cache: bool = True, stream: IO[str] | None = None) -> dict[str, Any]:
        """Generate the reply to `values` (template fields), writing it to `stream` as it comes."""
        prompt = prompt_text(self.template, values)
        prompt_ids = self.tokenizer.encode(prompt)
        if not prompt_ids:
            raise ConfigError("the prompt is empty; pass --prompt TEXT")
        decoder = StreamDecoder(self.tokenizer)
        stop = "max_new_tokens"
        t0 = time.perf_counter()
        for token in generate_ids(self.model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed, use_cache=use_cache, eos_id=self.tokenizer.eos_id):
            if token == self.tokenizer.eos_id:
                stop = "eos"
                break
            piece = decoder.push(token)
            if stream is not None and piece:
                stream.write(piece)
                stream.flush()
        rest = decoder.finish()
        if stream is not None and rest:
            stream.write(rest)
        elapsed = time.perf_counter() - t0
        n = len(decoder.ids) + (stop == "eos")
        return {"prompt": prompt, "answer": decoder.text, "prompt_tokens": len(prompt_ids), "new_tokens": n,
                "stop": stop, "tokens_per_s": round(n / max(elapsed, 1e-9), 2)}


def run(target: Path, *, prompt: str | None = None, category: str | None = None, intent: str | None = None,
        from_data: int | None = None, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
        seed: int = 0, as_json: bool = False, device: str = "auto", use_cache: bool = True,
        out: IO[str] | None = None) -> list[dict[str, Any]]:
    """`mlaunch generate`: answer `prompt` (the instruction; category and intent optional), or the
    first `from_data` held-out rows of the run's split beside their reference answers. Text mode
    streams each answer; `as_json` prints one JSON object per answer. Returns the records."""
    out = out or sys.stdout
    if (prompt is None) == (from_data is None):
        raise ConfigError("pass exactly one of --prompt TEXT and --from-data N")
    if from_data is not None and from_data < 1:
        raise ConfigError(f"--from-data {from_data}: N must be at least 1")
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError("--max-new-tokens must be >= 1, --temperature >= 0 (0 = greedy), --top-p in (0, 1]")
    gen = Generator.load(target, device)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, use_cache=use_cache)
    records = []
    if prompt is not None:
        values = {"instruction": prompt, "category": category or "", "intent": intent or ""}
        record = {"instruction": prompt, "category": category, "intent": intent,
                  **gen.answer(values, stream=None if as_json else out, **kw)}
        if as_json:
            out.write(json.dumps(record) + "\n")
        else:
            out.write("\n")
        records.append(record)
        return records
    if gen.train_cfg is None:
        raise ConfigError(f"--from-data: {target} has no run config.yaml beside it, so its held-out split is "
                          "unknown; pass the run's output_dir")
    for k, (row, values) in enumerate(held_out_rows(gen.train_cfg, from_data)):
        fields = {f: v for f, v in values.items() if f != "response"}
        if not as_json:
            out.write(f"--- held-out example {k + 1} (row {row})\n")
            for f, v in fields.items():
                out.write(f"{'question' if f == 'instruction' else f}: {v}\n")
            out.write(f"reference: {values.get('response', '')}\ngenerated: ")
            out.flush()
        result = gen.answer(values, stream=None if as_json else out, **kw)
        record = {"row": row, **fields, "reference": values.get("response"), **result}
        if as_json:
            out.write(json.dumps(record) + "\n")
        else:
            out.write("\n")
        out.flush()
        records.append(record)
    return records


# ------------------------------------------------------------------------------ `python -m train.generate`
def main(argv: list[str] | None = None) -> int:
    """The process `mlaunch generate` starts (the launcher never imports train/): the same options."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.generate", description=run.__doc__.splitlines()[0])
    p.add_argument("target", type=Path)
    p.add_argument("--prompt")
    p.add_argument("--category")
    p.add_argument("--intent")
    p.add_argument("--from-data", type=int)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="as_json", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-cache", action="store_true")
    a = p.parse_args(argv)
    return exports.run_command(lambda: run(
        a.target, prompt=a.prompt, category=a.category, intent=a.intent, from_data=a.from_data,
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
        as_json=a.as_json, device=a.device, use_cache=not a.no_cache))


if __name__ == "__main__":
    sys.exit(main())
