"""Generation: the KV cache against the training forward, sampling, streaming, and the one-line
errors of `mlaunch generate` / `mlaunch eval` (the trained end-to-end runs are in
tests/dist/test_generate.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from job.errors import ConfigError
from tests.helpers import ROOT, tiny_baichuan_config, tiny_tokenizer
from train.generate import StreamDecoder, generate_ids, next_token
from train.models.baichuan.model import BaichuanForCausalLM, KVCache, init_weights

VARIANTS = [("rope", False), ("rope", True), ("alibi", False), ("alibi", True)]


def _model(position: str, norm_head: bool, std: float = 0.3) -> BaichuanForCausalLM:
    torch.manual_seed(0)
    model = BaichuanForCausalLM(tiny_baichuan_config(position=position, norm_head=norm_head))
    init_weights(model, std)  # large weights: the logits are spread, so greedy choices are clear
    return model.eval()


@pytest.mark.parametrize(("position", "norm_head"), VARIANTS)
def test_cached_logits_equal_the_full_forward(position, norm_head):
    model = _model(position, norm_head)
    ids = torch.randint(3, 129, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(32)
        # The prompt, then single tokens, then a chunk of several after a non-empty cache.
        parts = [model.decode(ids[:, :7], cache)] + [model.decode(ids[:, i:i + 1], cache) for i in range(7, 12)]
        parts.append(model.decode(ids[:, 12:], cache))
    assert cache.length == 19
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("position", "norm_head"), VARIANTS)
def test_greedy_with_the_cache_equals_greedy_without(position, norm_head):
    model = _model(position, norm_head)
    prompt = [5, 17, 99, 42, 8, 77, 3]
    kw = dict(max_new_tokens=24, eos_id=-1)  # no EOS: all 24 steps are compared
    cached = list(generate_ids(model, prompt, use_cache=True, **kw))
    uncached = list(generate_ids(model, prompt, use_cache=False, **kw))
    assert cached == uncached and len(cached) == 24
    assert len(set(cached)) > 3  # a real sequence, not one token repeated


def test_generation_stops_at_eos():
    model = _model("rope", True)
    first = list(generate_ids(model, [5, 17, 99], max_new_tokens=1, eos_id=-1))[0]
    assert list(generate_ids(model, [5, 17, 99], max_new_tokens=10, eos_id=first)) == [first]


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([2.0, 1.9, -5.0, -6.0, 0.5])
    draws = lambda seed, **kw: [next_token(logits, generator=g, **kw)  # noqa: E731
                                for g in [torch.Generator().manual_seed(seed)] for _ in range(200)]
    a = draws(3, temperature=1.0, top_p=1.0)
    assert a == draws(3, temperature=1.0, top_p=1.0) and a != draws(4, temperature=1.0, top_p=1.0)
    assert set(draws(3, temperature=1.0, top_p=0.5)) == {0, 1}  # 0 alone holds < 0.5 of the mass
    assert set(draws(3, temperature=1.0, top_p=1e-6)) == {0}
    assert next_token(logits, 0.0, 0.5, None) == 0


def test_streamed_pieces_add_up_to_the_decoded_text(tmp_path):
    from train.tokenizer import BaichuanTokenizer

    tok = BaichuanTokenizer(tiny_tokenizer(tmp_path))
    text = "ünïcødé 日本 ok, check_cancellation_fee\n done"
    ids = tok.encode(text)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # byte pieces really occur
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_prompt_is_the_template_up_to_the_response():
    from job.config import TUTORIAL_TEMPLATE
    from train.generate import prompt_text

    got = prompt_text(TUTORIAL_TEMPLATE, {"instruction": "where is my order", "intent": "track_order"})
    assert got == "[INST] where is my order \n Category is  \n Intent is track_order [/INST]\n"


@pytest.mark.parametrize("make", ["missing", "empty_dir", "file", "run_without_export"])
def test_a_folder_that_is_not_an_export_is_one_line(tmp_path, make, capsys):
    from train import evaluate, generate

    target = tmp_path / "t"
    if make == "empty_dir":
        target.mkdir()
    elif make == "file":
        target.write_text("x")
    elif make == "run_without_export":
        target.mkdir()
        (target / "config.yaml").write_text("train: {model: {init: {}}}\n")
    for main in (lambda: generate.main(["--prompt", "hi", "--device", "cpu", str(target)]),
                 lambda: evaluate.main(["--device", "cpu", str(target)])):
        assert main() == 2
        err = capsys.readouterr().err
        assert err.startswith("mlaunch: error: ") and err.count("\n") == 1 and str(target) in err


def test_generate_needs_exactly_one_of_prompt_and_from_data(tmp_path):
    from launcher.infer import generate
    from train.generate import run

    for prompt, n in ((None, None), ("hi", 2)):
        with pytest.raises(ConfigError, match="exactly one of --prompt"):
            generate(tmp_path, prompt=prompt, from_data=n, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0,
                     as_json=False, category=None, intent=None, device="cpu", no_cache=False)
        with pytest.raises(ConfigError, match="exactly one of --prompt"):
            run(tmp_path, prompt=prompt, from_data=n)


def test_the_commands_register_with_typer_and_import_no_torch():
    code = ("import sys, typer; from typer.testing import CliRunner; from launcher import infer; "
            "assert 'torch' not in sys.modules; app = typer.Typer(); app.command('generate')(infer.generate); "
            "app.command('eval')(infer.evaluate); r = CliRunner().invoke(app, ['generate', '--help']); "
            "assert r.exit_code == 0 and '--from-data' in r.output and '--top-p' in r.output, r.output; "
            "r = CliRunner().invoke(app, ['eval', '--help']); assert r.exit_code == 0 and '--json' in r.output; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_the_registered_command_exits_2_with_the_childs_one_line(tmp_path):
    """Through a typer app as the CLI registers it: the child process says the line, the exit code is 2."""
    app = ("import typer; from launcher import infer; app = typer.Typer(); app.command('generate')(infer.generate); "
           "app.command('eval')(infer.evaluate); app()")
    r = subprocess.run([sys.executable, "-c", app, "generate", str(tmp_path), "--prompt", "-hi"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not an export" in r.stderr, r.stderr


def test_llama_export_of_an_alibi_model_is_refused_at_config_time():
    from job.config import validate

    for model in ({"init": {}, "variant": "baichuan2-13b"}, {"init": {}, "position": "alibi"},
                  {"name_or_path": "baichuan-inc/Baichuan-13B-Base"}):
        with pytest.raises(ConfigError, match="export_format llama needs a RoPE model") as e:
            validate({"train": {"model": model, "checkpoint": {"export_format": "llama"}}})
        assert "\n" not in str(e.value)
    validate({"train": {"model": {"init": {}, "variant": "baichuan-7b"}, "checkpoint": {"export_format": "llama"}}})
