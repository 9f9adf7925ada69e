"""Write a tiny transformers `LlamaForCausalLM` and its tokenizer to a folder, from nothing: no hub.

    python examples/make_tiny_llama.py /tmp/tiny-llama

The tokenizer is a byte-level BPE trained on the bundled Bitext sample (train/data/bitext_sample.jsonl),
so `AutoTokenizer.from_pretrained(folder)` and `AutoModelForCausalLM.from_pretrained(folder)` load
both as they would a published model. The examples (tutorial.py, hf_trainer.py) take the folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "train" / "data" / "bitext_sample.jsonl"


def make(folder: str | Path, *, vocab_size: int = 512, hidden_size: int = 64, layers: int = 2, heads: int = 4,
         seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    texts = [r[k] for r in rows for k in ("instruction", "response") if isinstance(r.get(k), str)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<unk>")
    tok.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    args = parser.parse_args()
    print(make(args.folder, layers=args.layers, hidden_size=args.hidden_size))
