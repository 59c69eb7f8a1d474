"""The ShapeWorld episode seed splits: which seeds train, which choose, which report.

Every ShapeWorld episode is fixed by its seed (:func:`~streamvlm.shapeworld.make_episode`), so a split
is a range of seeds. The ranges are disjoint and never change:

* ``train``: the training streams (``streamvlm.shapeworld.train``: ``TRAIN_SEED_BASE`` = 1,000,000 up,
  both for the question streams and the vision pretraining episodes).
* ``train_eval``: the streams the training loop evaluates itself on (``EVAL_SEED_BASE`` = 500,000 up).
* ``validation``: every choice is made here: training stage, retrieval depth, scoring layers,
  thresholds, trigger rules. It holds every seed the project tuned on before the splits existed
  (0-23 and 200-223, the held-out tests' 100-111, the demo's).
* ``test``: reported figures only, never a choice. No code or document used these seeds before.

Read them with :func:`split_range` / :func:`split_seeds`; ``streamvlm bench quality --split`` uses them.
"""

from __future__ import annotations

from typing import Literal

from ..errors import ConfigError

__all__ = ["Split", "SPLITS", "SPLIT_RANGES", "split_range", "split_seeds", "split_of"]

Split = Literal["train", "train_eval", "validation", "test"]

#: Half-open seed ranges [start, stop) per split; disjoint.
SPLIT_RANGES: dict[str, range] = {
    "validation": range(0, 100_000),
    "train_eval": range(500_000, 600_000),
    "test": range(700_000, 800_000),
    "train": range(1_000_000, 2**31 - 1),
}

#: Split names, in the order above.
SPLITS: tuple[str, ...] = tuple(SPLIT_RANGES)


def split_range(split: str) -> range:
    """The seeds of ``split`` as a range; ConfigError naming the splits for an unknown name."""
    if split not in SPLIT_RANGES:
        raise ConfigError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    return SPLIT_RANGES[split]


def split_seeds(split: str, count: int, offset: int = 0) -> list[int]:
    """``count`` seeds of ``split``, from its ``offset``-th seed on (the same list on every call).

    Raises ConfigError for an unknown split, a count below 1, a negative offset, or more seeds than the
    split holds.
    """
    seeds = split_range(split)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"count: must be an integer >= 1, got {count!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ConfigError(f"offset: must be an integer >= 0, got {offset!r}")
    if offset + count > len(seeds):
        raise ConfigError(f"count: the {split} split holds {len(seeds)} seeds, {offset} + {count} asked")
    return list(seeds[offset:offset + count])


def split_of(seed: int) -> str | None:
    """The split ``seed`` belongs to, or None for a seed outside every split."""
    for name, seeds in SPLIT_RANGES.items():
        if seed in seeds:
            return name
    return None
