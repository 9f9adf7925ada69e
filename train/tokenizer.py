"""Baichuan's SentencePiece tokenizer, used directly (no transformers tokenizer classes), and
the bootstrap that trains a tiny one when no tokenizer exists (`ensure_tokenizer`).

Ids follow the published ``tokenizer.model`` (job.baichuan): ``<unk>`` = 0 (also used for
padding), ``<s>`` = 1, ``</s>`` = 2.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm

from job.baichuan import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from job.errors import ConfigError, MlaunchError
from job.files import publish_file

if TYPE_CHECKING:
    from job.config import TrainConfig

log = logging.getLogger(__name__)


class BaichuanTokenizer:
    """Thin wrapper over ``SentencePieceProcessor`` with Baichuan's special ids."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model does not exist: {path}")
        self.model_file = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        found = (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if found != (UNK_ID, BOS_ID, EOS_ID):
            # Padding with id 0 and the data pipeline's bos/eos depend on this layout.
            raise ValueError(
                f"{path}: expected unk/bos/eos ids {UNK_ID}/{BOS_ID}/{EOS_ID}, found "
                f"{found[0]}/{found[1]}/{found[2]}; not a Baichuan-layout tokenizer"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encode many texts in one call (SentencePiece loops in C++, and can use threads)."""
        return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


def train_sentencepiece(
    texts: Iterable[str],
    out_path: str | os.PathLike[str],
    vocab_size: int = 512,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
) -> Path:
    """Train a small tokenizer in Baichuan's layout (unk=0, bos=1, eos=2, no pad piece).

    Meant for tests and toy runs: byte fallback keeps every string encodable, identity
    normalisation without a dummy prefix makes ``decode(encode(s)) == s``, a single thread
    and no sampling make it deterministic. ``vocab_size`` is an upper bound: a small corpus
    yields fewer pieces rather than an error. The file appears atomically."""
    if vocab_size < 260:
        raise ValueError(f"vocab_size must be at least 260 (256 byte pieces + specials), got {vocab_size}")
    buf = io.BytesIO()
    try:
        _train_into(buf, texts, vocab_size, model_type, character_coverage)
    except RuntimeError as e:
        if "smaller than required_chars" in str(e):
            raise ValueError(
                f"vocab_size {vocab_size} cannot hold the corpus' characters plus 259 byte/special "
                "pieces; raise vocab_size or lower character_coverage"
            ) from None
        raise

    return publish_file(out_path, buf.getvalue(), fsync=True)


def _train_into(
    buf: io.BytesIO, texts: Iterable[str], vocab_size: int, model_type: str, character_coverage: float
) -> None:
    # identity normalisation, no dummy prefix, kept whitespace: exact round trips.
    # One thread and no sentence sampling/shuffling: identical bytes on every run.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=character_coverage,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )


# ------------------------------------------------------------------------------------ bootstrap
def ensure_tokenizer(cfg: TrainConfig, model_dir: str | os.PathLike | None, cache_dir: str | os.PathLike, *,
                     local_rank: int, barrier: Callable[[], None]) -> Path:
    """The tokenizer.model to use: `train.tokenizer.path`, else `<model_dir>/tokenizer.model`, else
    one trained on the training texts (`train.tokenizer.train_vocab_size`; once per node, cached
    under `cache_dir`, deterministic, written atomically), else a ConfigError.

    Every rank calls this; `barrier` is called once by all of them only in the training case."""
    tok = cfg.tokenizer
    if tok.path:
        path = Path(os.path.expanduser(tok.path))
        if not path.is_file():
            raise ConfigError(f"train.tokenizer.path: {path} does not exist; "
                              "point it at a SentencePiece tokenizer.model")
        return path
    if model_dir is not None and (Path(model_dir) / "tokenizer.model").is_file():
        return Path(model_dir) / "tokenizer.model"
    if not tok.train_vocab_size:
        where = f"{model_dir} has no tokenizer.model" if model_dir is not None else "the model is built from `init`"
        raise ConfigError(f"train.tokenizer: {where}; set train.tokenizer.path, or train.tokenizer.train_vocab_size "
                          "to train one on the data")
    from train.data import training_texts  # heavy (datasets); only when a tokenizer is trained
    from train.distributed import local_rank0_first

    cache_dir = Path(cache_dir)

    def train_once() -> None:
        out = _tokenizer_path(cfg, cache_dir)
        if not out.is_file():
            try:
                train_sentencepiece(training_texts(cfg), out, tok.train_vocab_size)  # writes atomically
            except ValueError as e:
                raise ConfigError(f"train.tokenizer.train_vocab_size: {e}") from e
            log.info("trained a %d-piece tokenizer on %s → %s", tok.train_vocab_size, cfg.data.path, out)

    local_rank0_first(train_once, local_rank=local_rank, barrier=barrier)
    out = _tokenizer_path(cfg, cache_dir)
    if not out.is_file():
        raise MlaunchError(f"local rank 0 did not produce {out}; see its error above")
    return out


def _tokenizer_path(cfg: TrainConfig, cache_dir: Path) -> Path:
    from train.data.cache import cache_key, data_settings
    from train.data.sources import source_identity

    _, identity, _ = source_identity(cfg.data)
    key = cache_key({"what": "tokenizer", "source": identity, **data_settings(cfg),
                     "vocab": cfg.tokenizer.train_vocab_size})
    return cache_dir / f"tokenizer-{key}.model"
