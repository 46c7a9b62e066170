"""Labelled rows streamed from the files users have: CSV/TSV, JSON Lines, Parquet, a folder
written by `datasets`' save_to_disk, an image folder with one subfolder per class, and CoNLL
files of tagged words (token classification). Each
reader yields lists of row dicts, a batch at a time, so a file larger than memory is read
through without being held."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Iterator

from edgepipe import interrupts
from edgepipe.errors import InputError

BATCH = 512
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".conll")
Rows = Iterator[list[dict]]


def data_format(path: Path) -> str:
    """csv, jsonl, parquet, conll, saved (save_to_disk), images (class folders), txt or npz."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "saved"
        if any(p.is_dir() for p in path.iterdir()):
            return "images"
        raise InputError(f"{path} is a folder but neither an image folder (one subfolder of images per "
                         "class) nor a datasets save_to_disk folder (state.json)")
    if not path.is_file():
        raise InputError(f"data not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".npz", ".txt", ".conll"):
        return suffix[1:]
    raise InputError(f"{path}: unknown data format '{suffix}'; give .npz, .csv, .tsv, .jsonl, .parquet, "
                     ".conll (tagged words), .txt (language models), an image folder or a datasets "
                     "save_to_disk folder")


def _csv(path: Path) -> Rows:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        batch: list[dict] = []
        for row in reader:
            batch.append(row)
            if len(batch) == BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def _jsonl(path: Path) -> Rows:
    with path.open(encoding="utf-8") as handle:
        first = handle.read(1)
        handle.seek(0)
        if first == "[":  # one JSON array of objects (read whole: JSON has no streaming form)
            rows = json.load(handle)
            for i in range(0, len(rows), BATCH):
                yield rows[i:i + BATCH]
            return
        batch: list[dict] = []
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                batch.append(json.loads(line))
            except ValueError as exc:
                raise InputError(f"{path}, line {number}: not JSON ({exc})") from None
            if len(batch) == BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def _conll(path: Path) -> Rows:
    """One row per sentence: {"tokens": [...], "tags": [...]}, from lines of a word and its tag
    (the word in the first column, the tag in the last), sentences apart by a blank line."""
    batch: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(itertools.chain(handle, [""]), 1):  # "": the last sentence ends
            fields = line.split()
            if fields and fields[0] != "-DOCSTART-":
                if len(fields) < 2:
                    raise InputError(f"{path}, line {number}: a word without its tag; a CoNLL line is "
                                     "'WORD ... TAG', and a blank line ends a sentence")
                tokens.append(fields[0])
                tags.append(fields[-1])
            elif tokens:
                batch.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            if len(batch) == BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InputError("Parquet and save_to_disk data need pyarrow: pip install 'edgepipe[data]'") from None
    import pyarrow

    return pyarrow


def _parquet(path: Path) -> Rows:
    pa = _pyarrow()
    try:
        source = pa.parquet.ParquetFile(str(path))
    except Exception as exc:  # pyarrow raises ArrowInvalid and others on a damaged file
        interrupts.reraise()  # a termination, not this call's failure
        raise InputError(f"{path} is not a readable Parquet file: {str(exc).splitlines()[0][:200]}") from None
    for batch in source.iter_batches(batch_size=BATCH):
        yield batch.to_pylist()


def saved_splits(path: Path) -> list[str]:
    """The splits of a save_to_disk DatasetDict folder ([""] for a single Dataset)."""
    if (path / "dataset_dict.json").is_file():
        return list(json.loads((path / "dataset_dict.json").read_text()).get("splits", []))
    return [""]


def _saved(path: Path, split: str = "") -> Rows:
    pa = _pyarrow()
    folder = path / split if split else path
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: not a datasets save_to_disk folder ({exc})") from None
    for entry in state.get("_data_files", []):
        with pa.memory_map(str(folder / entry["filename"])) as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.to_pylist()


def _images(path: Path) -> Rows:
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    batch: list[dict] = []
    for folder in classes:
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                batch.append({"image": file, "label": folder.name})
                if len(batch) == BATCH:
                    yield batch
                    batch = []
    if batch:
        yield batch


def iter_rows(path: Path, split: str = "") -> Rows:
    kind = data_format(path)
    readers = {"csv": _csv, "jsonl": _jsonl, "parquet": _parquet, "conll": _conll, "images": _images}
    if kind == "saved":
        return _saved(path, split)
    if kind not in readers:
        raise InputError(f"{path}: a .{kind} file holds no labelled rows; a classifier takes CSV/TSV, JSONL, "
                         "Parquet, an image folder, a save_to_disk folder or an .npz of its inputs (plain .txt "
                         "is for language models)")
    return readers[kind](path)
