"""The SentencePiece wrapper and the tiny-tokenizer trainer used by tests and toy runs."""

from __future__ import annotations

import random

import pytest

from train.tokenizer import BaichuanTokenizer, train_sentencepiece


def sentences(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    intents = ["cancel_order", "get_refund", "track_order", "change_address", "payment_issue"]
    verbs = ["I want to", "please help me", "how do I", "can you", "I need to"]
    objects = ["cancel my order", "get a refund", "track order 12345", "change my address", "pay by card"]
    return [
        f"[INST] {rng.choice(verbs)} {rng.choice(objects)} \n Category is ORDER \n "
        f"Intent is {rng.choice(intents)} [/INST]\nSure, order #{rng.randint(0, 99999)} is handled."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BaichuanTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    assert train_sentencepiece(sentences(), path, vocab_size=400) == path
    return BaichuanTokenizer(path)


def test_special_ids_follow_baichuan_layout(tokenizer):
    assert (tokenizer.unk_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 0, 1, 2)
    assert [tokenizer.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert 260 <= tokenizer.vocab_size <= 400
    assert len(tokenizer) == tokenizer.vocab_size
    ids = tokenizer.encode("cancel my order", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert 0 not in tokenizer.encode("cancel my order")


@pytest.mark.parametrize(
    "text",
    [
        "[INST] how do I get a refund \n Category is ORDER [/INST]\nSure.",
        "  leading and  double spaces, tabs\tand newlines\n",
        "unseen: 退款 😀 Ünïcödé",  # only reachable through byte fallback
        "",
    ],
)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 < i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_batch_encode_matches_single(tokenizer):
    texts = sentences(20, seed=1)
    assert tokenizer.encode_batch(texts, add_eos=True) == [tokenizer.encode(t, add_eos=True) for t in texts]


def test_training_is_deterministic_and_compresses(tmp_path):
    a = train_sentencepiece(sentences(), tmp_path / "a.model", vocab_size=400)
    b = train_sentencepiece(sentences(), tmp_path / "b.model", vocab_size=400)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no temp files
    tok = BaichuanTokenizer(a)
    text = sentences(1, seed=7)[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_wrong_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        BaichuanTokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(["a b c"], tmp_path / "x.model", vocab_size=100)

    import sentencepiece as spm

    swapped = tmp_path / "swapped.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(50)), model_prefix=str(swapped.with_suffix("")),
        vocab_size=400, hard_vocab_limit=False, byte_fallback=True, bos_id=2, eos_id=1, minloglevel=2,
    )
    with pytest.raises(ValueError, match="not a Baichuan-layout tokenizer"):
        BaichuanTokenizer(swapped)


def test_too_small_vocab_for_the_characters_is_a_clear_error(tmp_path):
    many_chars = ["".join(chr(0x4E00 + i) for i in range(k, k + 20)) for k in range(0, 200, 20)]
    with pytest.raises(ValueError, match="raise vocab_size"):
        train_sentencepiece(many_chars, tmp_path / "x.model", vocab_size=300)
    assert list(tmp_path.iterdir()) == []
