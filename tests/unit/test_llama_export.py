"""`checkpoint.export_format: llama`: both RoPE variants load in stock transformers (no remote code)
with the project's logits and token ids; every export folder says what loads it."""

from __future__ import annotations

import json

import pytest
import torch

from job.baichuan import variant
from tests.helpers import tiny_tokenizer
from train.models.baichuan.hub import save_state_dict
from train.models.baichuan.model import BaichuanForCausalLM, init_weights

TEXTS = ["[INST] hi, would you kindly  help me cancel? [/INST]\ncheck_cancellation_fee",
         " a leading space", "ünïcødé 日本 123\n\ntwo  spaces"]


def _tiny(name: str) -> BaichuanForCausalLM:
    # The published layout of `name`, cut down; vocab 512 = the tiny tokenizer's.
    cfg = variant(name, vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, z_loss_weight=1e-3 if name.startswith("baichuan2") else 0.0)
    torch.manual_seed(0)
    model = BaichuanForCausalLM(cfg)
    init_weights(model, 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["baichuan-7b", "baichuan2-7b"])
def test_llama_export_loads_in_stock_transformers_with_our_logits_and_ids(tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.tokenizer import BaichuanTokenizer

    tok_file = tiny_tokenizer(tmp_path)
    model = _tiny(name)
    out = save_state_dict(model.state_dict(), model.config, tmp_path / "export", tokenizer_file=tok_file,
                          export_format="llama")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "LlamaForCausalLM" in (out / "README.md").read_text()

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no trust_remote_code
    assert type(hf).__name__ == "LlamaForCausalLM"
    hf_tok = AutoTokenizer.from_pretrained(out)
    sp = BaichuanTokenizer(tok_file)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == sp.encode(text), text
        assert hf_tok.decode(sp.encode(text)) == text
    assert (hf_tok.unk_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2, 0)

    ids = torch.tensor([sp.encode(t) for t in TEXTS[:1]])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    # And back: the project's own loader (what `mlaunch generate` uses) reads the llama layout.
    from train.exports import find_target, load_model

    back, mcfg, tok = load_model(find_target(out), None, torch.device("cpu"), torch.float32)
    assert mcfg.z_loss_weight == model.config.z_loss_weight and tok == out / "tokenizer.model"
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours, rtol=0, atol=1e-5)


def test_baichuan_layout_export_says_which_transformers_loads_it(tmp_path):
    model = _tiny("baichuan2-7b")
    out = save_state_dict(model.state_dict(), model.config, tmp_path / "export")
    readme = (out / "README.md").read_text()
    assert ">= 4.33, < 4.41" in readme and "mlaunch generate" in readme and "export_format: llama" in readme


def test_alibi_state_dict_is_refused_by_the_llama_writer(tmp_path):
    model = _tiny("baichuan-7b")
    from dataclasses import replace

    with pytest.raises(ValueError, match="needs a RoPE model"):
        save_state_dict(model.state_dict(), replace(model.config, position="alibi"), tmp_path / "x",
                        export_format="llama")
    assert not (tmp_path / "x").exists()
