"""Offline English text for language models: the help texts of Python's own documentation
(`pydoc_data.topics`, which ships with CPython), read at run time so nothing is downloaded.

Tokens are bytes (ids 0..255): any decoder with a vocabulary of at least 256 can be scored on
it, and a tiny model trained on it (models/lm.py) has a perplexity that means something. One
topic in eight is held out, never trained on.
"""

from __future__ import annotations

import numpy as np

from edgepipe.errors import InputError

HOLDOUT_EVERY = 8


def _topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # a Python built without its documentation
        raise InputError("this Python has no pydoc_data (its documentation texts), which the bundled text "
                         "sample is read from; install the full Python standard library") from exc
    return [topics[key] for key in sorted(topics)]


def token_ids(split: str = "heldout") -> np.ndarray:
    """The text as byte ids (uint8): `train` (7 topics in 8) or `heldout` (the others)."""
    if split not in ("train", "heldout"):
        raise InputError(f"split must be 'train' or 'heldout', got {split!r}")
    held = split == "heldout"
    parts = [t for i, t in enumerate(_topics()) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == held]
    return np.frombuffer("\n".join(parts).encode("utf-8"), dtype=np.uint8)


def windows(ids: np.ndarray, length: int, count: int) -> np.ndarray:
    """`count` windows of `length` tokens spread evenly over `ids` (int64, [count, length])."""
    if len(ids) < length + count:
        raise InputError(f"the text has {len(ids)} tokens, too few for {count} windows of {length}")
    starts = np.linspace(0, len(ids) - length, count).astype(np.int64)
    return np.stack([ids[s:s + length] for s in starts]).astype(np.int64)


def decode(ids) -> str:
    """Byte ids back to text (invalid UTF-8 replaced)."""
    return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")
