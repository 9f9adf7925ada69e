"""The product tutorial's fine-tuning loop as a plain script, parallelised by one line (`prepare`).

Alone:            python examples/tutorial.py MODEL_DIR
Through mlaunch:  mlaunch run examples/tutorial.yaml            (or: mlaunch run CONFIG -- examples/tutorial.py MODEL_DIR)

MODEL_DIR is any causal LM folder (`examples/make_tiny_llama.py` writes a tiny one). Everything
but the `prepare` line is the tutorial as written: transformers' Auto classes, `load_dataset` on a
JSON-lines file, the prompt, padding, the `mask_pads` labels (pad → -100, no loss), AdamW, epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the project's train package
from train.auto import finish, is_rank0, prepare  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "train" / "data" / "bitext_sample.jsonl"
TEMPLATE = "[INST] {instruction} \n Category is {category} \n Intent is {intent} [/INST]\n{response}"
COLUMNS = ("instruction", "category", "intent", "response")


def mask_pads(input_ids: list[list[int]], attention_mask: list[list[int]]) -> list[list[int]]:
    """Labels: the tokens themselves, padding replaced by -100 (cross-entropy ignores it)."""
    return [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(input_ids, attention_mask)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="folder of a causal LM (config.json, weights, tokenizer)")
    parser.add_argument("--data", default=str(SAMPLE), help="JSON-lines file with instruction/category/intent/response")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="per rank, for prepare's planner")
    parser.add_argument("--metrics", default=None, help="folder: every rank writes rank<N>.jsonl of its losses")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model)

    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.filter(lambda row: all(isinstance(row.get(c), str) and row[c] for c in COLUMNS))
    if args.max_rows:
        dataset = dataset.select(range(min(args.max_rows, len(dataset))))

    def tokenize(rows):
        texts = [TEMPLATE.format(**{c: rows[c][i] for c in COLUMNS}) for i in range(len(rows["response"]))]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length)
        enc["labels"] = mask_pads(enc["input_ids"], enc["attention_mask"])
        return enc

    dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    dataset.set_format("torch", columns=["input_ids", "attention_mask", "labels"])
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=args.shuffle)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    model, optimizer, loader = prepare(model, optimizer, loader, memory_budget_gb=args.memory_budget_gb)

    metrics = None
    if args.metrics:
        os.makedirs(args.metrics, exist_ok=True)
        metrics = open(Path(args.metrics) / f"rank{os.environ.get('RANK', '0')}.jsonl", "w")
        metrics.write(json.dumps({"plan": vars(model.mlaunch_plan)}) + "\n")
    device = next(model.parameters()).device
    model.train()
    step = 0
    for epoch in range(args.epochs):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if metrics:
                metrics.write(json.dumps({"step": step, "epoch": epoch, "loss": loss.item()}) + "\n")
            if is_rank0():
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
            if args.max_steps and step >= args.max_steps:
                break
        if args.max_steps and step >= args.max_steps:
            break
    if metrics:
        metrics.close()
    finish()


if __name__ == "__main__":
    main()
