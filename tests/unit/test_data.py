"""train/data/: loading, bad rows, tokenisation, the per-node cache, batching and padding.

All on the bundled generated sample (train/data/bitext_sample.jsonl) or tiny files written here;
a tokenizer is trained on the sample once per module (~0.1 s)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import train.data.cache as cache_mod
from job.baichuan import IGNORE_INDEX
from job.config import DataConfig, TrainConfig
from job.errors import ConfigError, MlaunchError
from train.data import (
    LengthGroupedBatches, PadToMaxBatches, PromptTemplate, collate, drop_bad_rows, iter_batches, load_rows,
    make_batch_sampler, prepare_data, real_token_fraction,
)
from train.tokenizer import BaichuanTokenizer, ensure_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "train" / "data" / "bitext_sample.jsonl"
FIELDS = ("instruction", "category", "intent", "response")  # what the default template uses


def no_barrier() -> None:
    pass


def train_cfg(tmp: Path, **data) -> TrainConfig:
    return TrainConfig.model_validate({
        "model": {"init": {}}, "tokenizer": {"train_vocab_size": 1000}, "output_dir": str(tmp),
        "data": {"path": str(SAMPLE), "max_length": 256, "eval_fraction": 0.05, **data}})


def raw_bad_rows() -> list[tuple[int, str]]:
    """(row index, first bad field) read straight from the JSONL, independent of the code under test."""
    bad = []
    for i, line in enumerate(SAMPLE.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        for f in FIELDS:
            v = row.get(f)
            if not isinstance(v, str) or not v.strip():
                bad.append((i, f))
                break
    return bad


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    return ensure_tokenizer(train_cfg(tmp), None, tmp / "cache", local_rank=0, barrier=no_barrier)


@pytest.fixture(scope="module")
def tok(tok_path) -> BaichuanTokenizer:
    return BaichuanTokenizer(tok_path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    tmp = tmp_path_factory.mktemp("prep")
    return prepare_data(train_cfg(tmp), tok, tmp / "cache", local_rank=0, barrier=no_barrier)


# ------------------------------------------------------------------------------ loading, rows
def test_sample_loads_in_hub_schema(tmp_path, monkeypatch):
    ds = load_rows(DataConfig(path=str(SAMPLE)))
    assert {"flags", "instruction", "category", "intent", "response"} <= set(ds.column_names)
    assert 350 <= len(ds) <= 450
    assert len(load_rows(DataConfig(path=str(SAMPLE), max_rows=10))) == 10
    # The configs' relative path is also found when running from another directory.
    monkeypatch.chdir(tmp_path)
    assert len(load_rows(DataConfig(path="train/data/bitext_sample.jsonl", max_rows=3))) == 3


def test_sample_has_the_documented_bad_rows():
    assert 3 <= len(raw_bad_rows()) <= 5


def test_bad_rows_are_skipped_and_counted(prepared):
    expected = raw_bad_rows()
    ds = load_rows(DataConfig(path=str(SAMPLE)))
    clean, skipped = drop_bad_rows(ds, DataConfig(path=str(SAMPLE)), "sample")
    assert skipped == len(expected) and len(clean) == len(ds) - skipped
    assert prepared.skipped == len(expected) == prepared.stats.skipped
    assert prepared.stats.train_examples + prepared.stats.eval_examples == len(ds) - len(expected)
    assert len(prepared.train) == prepared.stats.train_examples and len(prepared.eval) == prepared.stats.eval_examples


def test_bad_rows_error_names_row_and_field():
    index, field = raw_bad_rows()[0]
    cfg = DataConfig(path=str(SAMPLE), bad_rows="error")
    with pytest.raises(ConfigError) as e:
        drop_bad_rows(load_rows(cfg), cfg, str(SAMPLE))
    msg = str(e.value)
    assert f"row {index} " in msg and f"`{field}`" in msg and "\n" not in msg


def test_missing_local_file_is_one_line_config_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError) as e:
        load_rows(DataConfig(path=str(missing)))
    assert str(missing) in str(e.value) and "\n" not in str(e.value)


def test_unknown_column_and_template_without_response_are_config_errors():
    ds = load_rows(DataConfig(path=str(SAMPLE), max_rows=5))
    with pytest.raises(ConfigError, match="did you mean `instruction`"):
        drop_bad_rows(ds, DataConfig(path=str(SAMPLE), columns={"instruction": "instructions"}), "s")
    with pytest.raises(ConfigError, match=r"\{response\}"):
        PromptTemplate.parse("[INST] {instruction} [/INST]")


OLD_COLUMNS = ["context", "role", "instruction", "intent", "entity_type", "entity_value", "start_offset",
               "end_offset", "category", "tags", "response"]


def write_old_schema_csv(path: Path) -> None:
    """A few rows in the older Bitext release's columns (`tags`, extra entity columns), our own text."""
    rows = [
        ["customer support", "virtual assistant", "how do I cancel order 1234?", "cancel_order", "order_id",
         "00001234", "22", "26", "ORDER", "BI", "Sure. Open {{Order History}}, pick the order and press cancel."],
        ["customer support", "virtual assistant", "12345", "track_order", "", "", "", "", "ORDER", "BK",
         "Your parcel is on its way; follow it with {{Tracking Number}}."],
        ["customer support", "virtual assistant", "I want a refund", "get_refund", "", "", "", "", "REFUND", "B",
         "NA"],
        ["customer support", "virtual assistant", "delete my account", "delete_account", "", "", "", "",
         "ACCOUNT", "BL", ""],
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(OLD_COLUMNS)
        w.writerows(rows)


def test_older_tags_schema_loads(tmp_path, tok):
    path = tmp_path / "old.csv"
    write_old_schema_csv(path)
    ds = load_rows(DataConfig(path=str(path)))
    assert "tags" in ds.column_names and len(ds) == 4
    # Digits-only text stays text, "NA" stays a string; only the empty response is a bad row.
    clean, skipped = drop_bad_rows(ds, DataConfig(path=str(path)), "old")
    assert skipped == 1 and clean["instruction"][:][1] == "12345" and clean["response"][:][2] == "NA"
    # A template using {flags} reads the old `tags` column (explicitly mapped, or found by itself).
    template = "[{flags}] {instruction} [/INST]\n{response}"
    for columns in ({"flags": "tags"}, {}):
        cfg = train_cfg(tmp_path, path=str(path), template=template, columns=columns, eval_fraction=0)
        prep = prepare_data(cfg, tok, tmp_path / "cache", local_rank=0, barrier=no_barrier)
        texts = [tok.decode(x) for x in prep.train["input_ids"][:]]
        assert prep.skipped == 1 and texts[0].startswith("[BI] how do I cancel") and prep.eval is None


# ------------------------------------------------------------------------------- tokenisation
def test_every_example_ends_with_eos_and_labels_equal_ids(prepared):
    for ex in prepared.train:
        assert ex["input_ids"][-1] == 2 and ex["length"] == len(ex["input_ids"])
        assert ex["labels"] == ex["input_ids"]  # loss_on: all (the tutorial's)
        assert 1 not in ex["input_ids"][:1]  # no BOS


def test_truncation_keeps_eos(tmp_path, tok):
    cfg = train_cfg(tmp_path, max_length=32)
    prep = prepare_data(cfg, tok, tmp_path / "cache", local_rank=0, barrier=no_barrier)
    lengths = prep.train["length"][:]
    assert max(lengths) == 32 and prep.stats.at_max_length > 0
    for ids in prep.train["input_ids"][:]:
        assert len(ids) <= 32 and ids[-1] == 2


def test_loss_on_response_masks_exactly_the_prompt(tmp_path, tok, prepared):
    cfg = train_cfg(tmp_path, loss_on="response")
    prep = prepare_data(cfg, tok, tmp_path / "cache", local_rank=0, barrier=no_barrier)
    # Same tokens as loss_on: all; only the labels differ.
    assert prep.train["input_ids"][:] == prepared.train["input_ids"][:]
    template = PromptTemplate.parse(cfg.data.template)
    for ex in prep.train.select(range(20)):
        text = tok.decode(ex["input_ids"][:-1])
        prompt = text[: text.index("[/INST]\n") + len("[/INST]\n")]
        assert template.prompt.endswith("[/INST]\n")
        n_prompt = len(tok.encode(prompt))
        assert all(x == IGNORE_INDEX for x in ex["labels"][:n_prompt])
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["labels"][-1] == 2


# ---------------------------------------------------------------------------------- collating
def test_collate_pads_right_with_masked_labels():
    examples = [{"input_ids": [5, 6, 7, 2], "labels": [-100, 6, 7, 2]}, {"input_ids": [9, 2], "labels": [9, 2]}]
    b = collate(examples, pad_id=0)
    assert b["input_ids"].shape == (2, 8)  # longest 4, rounded up to a multiple of 8
    assert b["input_ids"][1].tolist() == [9, 2, 0, 0, 0, 0, 0, 0]
    assert b["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert b["labels"][0].tolist() == [-100, 6, 7, 2, -100, -100, -100, -100]
    assert b["labels"][1].tolist() == [9, 2] + [-100] * 6
    assert collate(examples, max_length=6)["input_ids"].shape == (2, 6)  # never beyond max_length
    assert collate(examples, pad_to=16)["input_ids"].shape == (2, 16)
    cols = collate({"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]})
    assert all((cols[k] == b[k]).all() for k in b)


def test_length_grouped_batches_are_at_least_90_percent_real_tokens(prepared):
    cfg = DataConfig(path=str(SAMPLE), max_length=256, micro_batch_size=8)
    lengths = prepared.train["length"][:]
    grouped = list(iter_batches(prepared.train, make_batch_sampler(cfg, lengths, dp_rank=0, dp_size=1, seed=1), cfg))
    frac = real_token_fraction(grouped)
    assert frac >= 0.90, frac
    assert all(b["labels"][b["attention_mask"] == 0].eq(IGNORE_INDEX).all() for b in grouped)
    padded_cfg = cfg.model_copy(update={"batching": "pad_to_max"})
    padded = list(iter_batches(prepared.train, make_batch_sampler(padded_cfg, lengths, dp_rank=0, dp_size=1, seed=1),
                               padded_cfg))
    assert all(b["input_ids"].shape[1] == 256 for b in padded) and real_token_fraction(padded) < frac


# ---------------------------------------------------------------------------------- sampling
LENGTHS = np.random.default_rng(0).integers(20, 400, size=203)


def epoch_of(sampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def test_sampler_covers_every_example_once_per_epoch_minus_the_tail():
    s = LengthGroupedBatches(LENGTHS, 4, dp_size=2, dp_rank=0, seed=3, chunk_batches=4)
    batches = s.global_batches(0)
    assert len(s) == 203 // 8 and batches.shape == (25, 8)
    flat = batches.ravel()
    assert len(set(flat.tolist())) == len(flat) == 200  # no repeats; 3 dropped
    # Batches group similar lengths: far less spread than random batches of the same size.
    spread = (LENGTHS[batches].max(1) - LENGTHS[batches].min(1)).mean()
    rand = PadToMaxBatches(LENGTHS, 4, dp_size=2, seed=3).global_batches(0)
    assert spread < 0.5 * (LENGTHS[rand].max(1) - LENGTHS[rand].min(1)).mean()
    assert LENGTHS[batches[0]].max() == LENGTHS[flat].max()  # longest batch first


def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b, c = (LengthGroupedBatches(LENGTHS, 8, seed=s) for s in (1, 1, 2))
    assert epoch_of(a) == epoch_of(b) != epoch_of(c)
    assert a.epoch == 1 and epoch_of(a) != epoch_of(LengthGroupedBatches(LENGTHS, 8, seed=1))  # next epoch differs


@pytest.mark.parametrize("cls", [LengthGroupedBatches, PadToMaxBatches])
def test_rank_slices_union_to_the_single_rank_global_batches(cls):
    single = epoch_of(cls(LENGTHS, 8, seed=5))
    r0, r1 = (epoch_of(cls(LENGTHS, 4, dp_rank=r, dp_size=2, seed=5)) for r in (0, 1))
    assert [a + b for a, b in zip(r0, r1)] == single
    assert all(len(x) == 4 for x in r0 + r1)


def test_sampler_resumes_mid_epoch_exactly():
    full = LengthGroupedBatches(LENGTHS, 4, dp_rank=1, dp_size=2, seed=9)
    reference = epoch_of(full) + epoch_of(full)  # two epochs, uninterrupted
    first = LengthGroupedBatches(LENGTHS, 4, dp_rank=1, dp_size=2, seed=9)
    it = iter(first)
    seen = [next(it) for _ in range(10)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = LengthGroupedBatches(LENGTHS, 4, dp_rank=1, dp_size=2, seed=9)
    resumed.load_state_dict(state)
    assert seen + epoch_of(resumed) + epoch_of(resumed) == reference
    with pytest.raises(ConfigError, match="global_batch_size"):
        LengthGroupedBatches(LENGTHS, 8, seed=9).load_state_dict({**state, "global_batch_size": 4})
    # Same global batch size on a different data-parallel size resumes too (2×4 → 1×8).
    whole = LengthGroupedBatches(LENGTHS, 8, seed=9)
    whole.load_state_dict(state)
    assert [b[4:] for b in epoch_of(whole)] == reference[10:len(full)]


def test_sampler_needs_one_full_global_batch():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        LengthGroupedBatches(LENGTHS[:5], 4, dp_size=2)


# ------------------------------------------------------------------------------ cache, ranks
def test_second_prepare_reuses_the_cache(tmp_path, tok, monkeypatch):
    calls = []
    real = cache_mod.tokenize_rows
    monkeypatch.setattr(cache_mod, "tokenize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = train_cfg(tmp_path)
    first = prepare_data(cfg, tok, tmp_path / "cache", local_rank=0, barrier=no_barrier)
    second = prepare_data(cfg, tok, tmp_path / "cache", local_rank=0, barrier=no_barrier)
    assert calls == [1] and not first.from_cache and second.from_cache
    assert second.train["input_ids"][:] == first.train["input_ids"][:] and second.stats == first.stats
    # Anything that changes the tokens gives a new cache entry.
    third = prepare_data(train_cfg(tmp_path, max_length=64), tok, tmp_path / "cache", local_rank=0, barrier=no_barrier)
    assert calls == [1, 1] and not third.from_cache and third.cache_path != first.cache_path


def test_other_local_ranks_wait_then_reuse_rank0s_work(tmp_path, tok, monkeypatch):
    cfg = train_cfg(tmp_path)
    calls, order = [], []
    real = cache_mod.tokenize_rows
    monkeypatch.setattr(cache_mod, "tokenize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))

    def barrier():  # stands in for dist.barrier: local rank 0 does its work while rank 1 waits here
        order.append("rank 1 waits")
        prepare_data(cfg, tok, tmp_path / "cache", local_rank=0, barrier=lambda: order.append("rank 0 done"))

    got = prepare_data(cfg, tok, tmp_path / "cache", local_rank=1, barrier=barrier)
    assert order == ["rank 1 waits", "rank 0 done"] and calls == [1]  # tokenised once, by rank 0
    assert got.from_cache and got.skipped == len(raw_bad_rows()) and len(got.train) > 0


def test_rank0_failure_still_reaches_the_barrier(tmp_path, tok):
    cfg = train_cfg(tmp_path, bad_rows="error")
    hits = []
    with pytest.raises(ConfigError, match="row"):
        prepare_data(cfg, tok, tmp_path / "cache", local_rank=0, barrier=lambda: hits.append(0))
    with pytest.raises(MlaunchError, match="local rank 0"):
        prepare_data(cfg, tok, tmp_path / "cache", local_rank=1, barrier=lambda: hits.append(1))
    assert hits == [0, 1]


def test_ensure_tokenizer_sources(tmp_path, tok_path):
    cfg = train_cfg(tmp_path)
    given = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"path": str(tok_path)})})
    assert ensure_tokenizer(given, None, tmp_path, local_rank=0, barrier=no_barrier) == tok_path
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes(tok_path.read_bytes())
    assert ensure_tokenizer(cfg, model_dir, tmp_path, local_rank=0, barrier=no_barrier) == model_dir / "tokenizer.model"
    # Trained: deterministic, and other ranks get the same file after the barrier.
    trained = ensure_tokenizer(cfg, None, tmp_path / "c", local_rank=0, barrier=no_barrier)
    assert trained.read_bytes() == tok_path.read_bytes()
    assert ensure_tokenizer(cfg, None, tmp_path / "c", local_rank=3, barrier=no_barrier) == trained
    none = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"train_vocab_size": None})})
    with pytest.raises(ConfigError, match="train_vocab_size"):
        ensure_tokenizer(none, None, tmp_path, local_rank=0, barrier=no_barrier)
    missing = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"path": str(tmp_path / "x.model")})})
    with pytest.raises(ConfigError, match="x.model"):
        ensure_tokenizer(missing, None, tmp_path, local_rank=0, barrier=no_barrier)
