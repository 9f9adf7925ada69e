"""`mlaunch generate` / `mlaunch eval` on a real run (`python -m train`): a tiny model trained to
overfit a few rows answers one of them with its reference response, and eval reproduces the
trainer's eval_loss for the same weights and split."""

from __future__ import annotations

import io
import json

import pytest

from tests.helpers import SAMPLE_DATA, read_eval_metrics, run_train, write_job


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overfit")
    # 12 rows (9 train, 3 held out); the intent as a short answer; loss on the answer only; the
    # whole training split in every optimizer step (3 micro-batches of 3): ~100 steps memorise it.
    cfg = write_job(tmp, max_steps=100, grad_accum=3, log_every=50,
                    model={"init": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                    "num_attention_heads": 4}},
                    data=OVERFIT_DATA, optim={"lr": 1e-2}, schedule={"warmup_steps": 5, "decay": "cosine"})
    result = run_train(cfg, timeout=120)
    assert result.returncode == 0, result.stderr
    return tmp / "run", cfg


OVERFIT_DATA = {"max_rows": 12, "eval_fraction": 0.25, "micro_batch_size": 3, "max_length": 128, "loss_on": "response"}


def _training_rows(run_dir):
    """The rows of the run's training split (what the model memorised), with their template fields."""
    from job.config import load_config
    from train.data import drop_bad_rows, load_rows, split_indices

    cfg = load_config(run_dir / "config.yaml").train
    clean, _ = drop_bad_rows(load_rows(cfg.data), cfg.data, str(SAMPLE_DATA), quiet=True)
    train_idx, eval_idx = split_indices(len(clean), cfg.data.eval_fraction, cfg.seed)
    return [clean[int(i)] for i in train_idx], [clean[int(i)] for i in eval_idx]


def test_the_overfit_model_answers_a_training_row_with_its_reference(overfit_run):
    from train.generate import run

    run_dir, _ = overfit_run
    train_rows, _ = _training_rows(run_dir)
    out = io.StringIO()
    records = run(run_dir, prompt=train_rows[0]["instruction"], max_new_tokens=32, device="cpu", out=out)
    assert records[0]["answer"] == train_rows[0]["intent"] and records[0]["stop"] == "eos"
    assert out.getvalue() == train_rows[0]["intent"] + "\n"  # streamed as it was generated
    # The same answer through the export folder itself, with and without the KV cache.
    for use_cache in (True, False):
        again = run(run_dir / "export", prompt=train_rows[0]["instruction"], max_new_tokens=32, device="cpu",
                    as_json=True, use_cache=use_cache, out=io.StringIO())
        assert again[0]["answer"] == records[0]["answer"]


def test_from_data_shows_held_out_rows_beside_their_references(overfit_run):
    from train.generate import run

    run_dir, _ = overfit_run
    _, eval_rows = _training_rows(run_dir)
    out = io.StringIO()
    run(run_dir, from_data=2, max_new_tokens=16, device="cpu", as_json=True, out=out)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["instruction"] for r in records] == [r["instruction"] for r in eval_rows[:2]]
    assert [r["reference"] for r in records] == [r["intent"] for r in eval_rows[:2]]
    text = io.StringIO()
    run(run_dir, from_data=1, max_new_tokens=16, device="cpu", temperature=0.7, top_p=0.9, seed=1, out=text)
    lines = text.getvalue().splitlines()
    assert lines[1] == f"question: {eval_rows[0]['instruction']}" and lines[2] == f"reference: {eval_rows[0]['intent']}"
    assert lines[3].startswith("generated: ")


def test_eval_gives_the_trainers_eval_loss_and_the_base_model_is_worse(overfit_run):
    from train.evaluate import run

    run_dir, job_yaml = overfit_run
    trainer = read_eval_metrics(run_dir)[-1]["eval_loss"]
    out = io.StringIO()
    record = run(run_dir, as_json=True, device="cpu", out=out)
    assert json.loads(out.getvalue())["loss"] == record["loss"]
    assert record["loss"] == pytest.approx(trainer, rel=1e-5) and record["examples"] == 3
    assert record["perplexity"] == pytest.approx(2.718281828 ** record["ce_loss"])
    base = run(job_yaml, device="cpu", out=io.StringIO())  # model.init with the run's seed: the untrained start
    assert base["loss"] > record["loss"] + 1
    # A job whose base is a pretrained folder (here: the export itself) is read from that folder.
    pretrained = write_job(job_yaml.parent, name="pretrained", output_dir=str(job_yaml.parent / "pretrained"),
                           model={"init": None, "name_or_path": str(run_dir / "export")}, data=OVERFIT_DATA)
    assert run(pretrained, device="cpu", out=io.StringIO())["loss"] == pytest.approx(record["loss"], rel=1e-6)


@pytest.mark.parametrize("kind", ["llama_export", "lora_adapter"])
def test_eval_and_generate_read_llama_exports_and_lora_adapters(tmp_path, kind):
    from train.evaluate import run as evaluate
    from train.generate import run as generate

    extra = ({"checkpoint": {"export_dtype": "float32", "export_format": "llama"}} if kind == "llama_export"
             else {"lora": {"r": 4}})
    cfg = write_job(tmp_path, max_steps=3, data={"max_rows": 12, "eval_fraction": 0.25, "micro_batch_size": 3},
                    **extra)
    result = run_train(cfg, timeout=120)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    marker = "config.json" if kind == "llama_export" else "adapter_config.json"
    assert (run_dir / "export" / marker).is_file()
    if kind == "llama_export":
        assert json.loads((run_dir / "export" / "config.json").read_text())["model_type"] == "llama"
    record = evaluate(run_dir, device="cpu", out=io.StringIO())
    assert record["loss"] == pytest.approx(read_eval_metrics(run_dir)[-1]["eval_loss"], rel=1e-5)
    answers = [generate(run_dir / "export", prompt="hi, I want to cancel my order", max_new_tokens=12, device="cpu",
                        use_cache=use_cache, out=io.StringIO())[0]["answer"] for use_cache in (True, False)]
    assert answers[0] == answers[1]
