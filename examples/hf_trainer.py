"""Fine-tune a causal LM with the Hugging Face `Trainer`, unchanged by mlaunch: the Trainer reads
torchrun's environment (RANK, WORLD_SIZE, ...) and runs DDP itself.

Alone:            python examples/hf_trainer.py MODEL_DIR OUTPUT_DIR
Through mlaunch:  mlaunch run CONFIG -- examples/hf_trainer.py MODEL_DIR OUTPUT_DIR --max-steps 20

MODEL_DIR is any causal LM folder (`examples/make_tiny_llama.py` writes a tiny one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the project's train package
from train.auto import finish  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "train" / "data" / "bitext_sample.jsonl"
TEMPLATE = "[INST] {instruction} \n Category is {category} \n Intent is {intent} [/INST]\n{response}"
COLUMNS = ("instruction", "category", "intent", "response")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("output_dir")
    parser.add_argument("--data", default=str(SAMPLE))
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.filter(lambda row: all(isinstance(row.get(c), str) and row[c] for c in COLUMNS))

    def tokenize(rows):
        texts = [TEMPLATE.format(**{c: rows[c][i] for c in COLUMNS}) for i in range(len(rows["response"]))]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length)
        enc["labels"] = [[t if m else -100 for t, m in zip(ids, mask)]  # pads carry no loss
                         for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    training = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        max_steps=args.max_steps, num_train_epochs=args.epochs, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        ddp_backend=None if torch.cuda.is_available() else "gloo", ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset)
    result = trainer.train()
    if trainer.is_world_process_zero():
        summary = {"world_size": training.world_size, "steps": result.global_step, "loss": result.training_loss,
                   "rank": int(os.environ.get("RANK", 0))}
        Path(args.output_dir, "result.json").write_text(json.dumps(summary) + "\n")
        print(f"trained {result.global_step} steps on {training.world_size} rank(s), loss {result.training_loss:.4f}")
    finish()


if __name__ == "__main__":
    main()
