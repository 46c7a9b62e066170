"""Quieting the libraries edgepipe drives: their warnings are meant for their own developers,
and each stage reports what matters itself."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """No log record below ERROR from any library while the block runs (torch and onnxruntime
    log through handlers that hold the real stderr, so redirecting sys.stderr misses them)."""
    level = logging.root.level
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        logging.root.setLevel(level)
