"""Plain text for language models: read in blocks, tokenized by the tokenizer the decoder file
carries, and cut into windows of equal length (held-out rows for perplexity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepipe.errors import InputError

BLOCK_CHARS = 1 << 20


def text_windows(path: str | Path, tokenizer_json: str | None, length: int, count: int) -> np.ndarray:
    """Up to `count` windows [count, length] of token ids from the text file at `path`; reading
    stops once they are full, so the file may be larger than memory."""
    path = Path(path)
    if tokenizer_json is None:
        raise InputError(f"the decoder carries no tokenizer, so {path.name} cannot become token ids: export it "
                         "from a folder with tokenizer.json, or give --data as an .npz with input_ids")
    try:
        import tokenizers
    except ImportError:
        raise InputError("text data needs the tokenizers package: pip install 'edgepipe[text]'") from None
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    ids: list[int] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        rest = ""
        while len(ids) < length * count:
            block = handle.read(BLOCK_CHARS)
            text = rest + block
            cut = text.rfind("\n") + 1 if block else len(text)  # tokenize whole lines
            if not text:
                break
            ids += tokenizer.encode(text[:cut or len(text)], add_special_tokens=False).ids
            rest = text[cut:] if cut else ""
            if not block:
                break
    windows = len(ids) // length
    if windows == 0:
        raise InputError(f"{path} holds {len(ids)} tokens; one held-out window needs {length}")
    return np.asarray(ids[:min(windows, count) * length], dtype=np.int64).reshape(-1, length)
