"""Which examples go into each step: the distributed batch samplers.

Every micro-step has one global batch (`micro_batch_size × dp_size` examples) chosen from the
example lengths, the seed and the epoch only; each data-parallel rank takes its slice. The
default groups examples of similar length, so padding (train/data/padding.py) costs almost
nothing; `pad_to_max` is the tutorial's baseline."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from job.config import DataConfig
from job.errors import ConfigError
from train.data.examples import seed_words


class _GlobalBatchSampler:
    """Yields this data-parallel rank's micro-batch (a list of example indices) per step.

    Every micro-step has one GLOBAL batch of `micro_batch_size × dp_size` examples, a function of
    (lengths, global batch size, seed, epoch) only; rank r takes its slice [r·b, (r+1)·b). So
    "2 ranks × micro-batch b" sees exactly the examples of "1 rank × micro-batch 2b".

    Iterating continues where the sampler stands: the rest of the current epoch, after which
    `epoch` advances. `state_dict()` after k batches were handed out resumes at batch k (the
    position counts batches yielded; a DataLoader with worker prefetch would run ahead of it,
    so iterate the sampler directly or use num_workers=0). The last incomplete global batch of
    each epoch is dropped: every step then has the same global batch size (equal loss scale,
    identical shapes across ranks); the order is reshuffled every epoch, so different examples
    fall off each time."""

    def __init__(self, lengths: Sequence[int] | np.ndarray, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0) -> None:
        assert 0 <= dp_rank < dp_size and micro_batch_size >= 1
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.global_batch_size = micro_batch_size * dp_size
        if len(self.lengths) < self.global_batch_size:
            raise ConfigError(f"data: {len(self.lengths)} training examples cannot fill one global batch of "
                              f"{self.global_batch_size} (micro_batch_size {micro_batch_size} × {dp_size} "
                              "data-parallel ranks); lower data.micro_batch_size or add data")
        self.epoch = 0
        self.next_batch = 0

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank (= global batches per epoch)."""
        return len(self.lengths) // self.global_batch_size

    def global_batches(self, epoch: int) -> np.ndarray:
        """All global batches of `epoch`, shape (len(self), global_batch_size)."""
        raise NotImplementedError

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng(seed_words(self.seed, epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        lo = self.dp_rank * self.micro_batch_size
        while self.next_batch < len(batches):
            i = self.next_batch
            self.next_batch += 1  # before yielding: a state_dict taken now resumes after this batch
            yield batches[i, lo:lo + self.micro_batch_size].tolist()
        self.epoch += 1
        self.next_batch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_examples": len(self.lengths)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        # dp_size may change (same global batch size); anything else would silently change the order.
        for k in ("seed", "global_batch_size", "num_examples"):
            if state[k] != self.state_dict()[k]:
                raise ConfigError(f"cannot resume the data order: the checkpoint has {k}={state[k]}, this run "
                                  f"{self.state_dict()[k]}; keep the seed, data and micro_batch_size × data-parallel "
                                  "size of the run you resume")
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])


class LengthGroupedBatches(_GlobalBatchSampler):
    """Global batches of similar lengths, in random order: almost no padding, still shuffled.

    Per epoch: shuffle (seed, epoch); cut into chunks of `chunk_batches` global batches; sort each
    chunk by length; cut it into global batches; shuffle the batch order. Bigger chunks pad less
    but vary batch composition less across epochs. The batch holding the longest example goes
    first, so an out-of-memory error shows at step 1 rather than hours into the run."""

    def __init__(self, lengths: Sequence[int] | np.ndarray, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, chunk_batches: int = 64) -> None:
        super().__init__(lengths, micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
        assert chunk_batches >= 1
        self.chunk_batches = chunk_batches

    def global_batches(self, epoch: int) -> np.ndarray:
        g = self.global_batch_size
        rng = self._rng(epoch)
        perm = rng.permutation(len(self.lengths))[: len(self) * g]  # drop the incomplete tail
        chunk = self.chunk_batches * g
        groups = []
        for start in range(0, len(perm), chunk):
            c = perm[start:start + chunk]
            c = c[np.argsort(-self.lengths[c], kind="stable")]
            groups.append(c.reshape(-1, g))
        batches = np.concatenate(groups)[rng.permutation(len(self))]
        first = int(np.argmax(self.lengths[batches].max(axis=1)))
        batches[[0, first]] = batches[[first, 0]]
        return batches


class PadToMaxBatches(_GlobalBatchSampler):
    """The tutorial's batching: random order (seed, epoch); collate with pad_to=max_length.
    Kept as the baseline the benchmark compares against."""

    def global_batches(self, epoch: int) -> np.ndarray:
        g = self.global_batch_size
        return self._rng(epoch).permutation(len(self.lengths))[: len(self) * g].reshape(-1, g)


def make_batch_sampler(cfg: DataConfig, lengths: Sequence[int] | np.ndarray, *, dp_rank: int, dp_size: int,
                       seed: int) -> _GlobalBatchSampler:
    """The sampler `cfg.batching` asks for (`lengths`: the dataset's `length` column)."""
    cls = LengthGroupedBatches if cfg.batching == "length_grouped" else PadToMaxBatches
    return cls(np.asarray(lengths), cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
