"""Which preprocessing a model takes its data through: the one its ONNX file carries, or for a
Hugging Face folder its own tokenizer or image processor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgepipe.data.named import NamedInputs
from edgepipe.data.rows import TABLE_SUFFIXES
from edgepipe.errors import InputError
from edgepipe.runtime.modelfile import onnx_metadata
from edgepipe.runtime.preprocess import Preprocess


@dataclass(frozen=True)
class DataOptions:
    """How rows become inputs: columns (detected when not named) and how many rows to read."""

    input_columns: tuple[str, ...] = ()  # the text column and its pair, or the image column
    label_column: str | None = None
    max_test: int = 1000  # held-out rows that judge accuracy
    max_calibration: int = 256
    seed: int = 0
    test_fraction: float = 0.2  # of the rows, seeded; 1.0 when calibration rows come from elsewhere


def file_preprocess(model: str | Path) -> Preprocess | None:
    try:
        return Preprocess.from_metadata(onnx_metadata(model))
    except OSError:
        return None


def no_preprocess(model: str | Path, data: Path) -> InputError:
    return InputError(f"{model} carries no tokenizer or image processor, so {data.name} cannot become its "
                      "inputs: export it from a Hugging Face folder that has its tokenizer files (or "
                      "preprocessor_config.json for images), or give an .npz of its inputs")


def read_for_model(data: str | Path, pre: Preprocess | None, model: str | Path, options: DataOptions,
                   say: Callable[[str], None] | None = None) -> NamedInputs:
    """Labelled rows (CSV, JSONL, Parquet, save_to_disk, image folder) as `model`'s inputs."""
    from edgepipe.data.labelled import load_labelled

    data = Path(data)
    if pre is None:
        raise no_preprocess(model, data)
    return load_labelled(data, pre, seed=options.seed, max_test=options.max_test,
                         max_calibration=options.max_calibration, text_columns=options.input_columns,
                         label_column=options.label_column, test_fraction=options.test_fraction, say=say)


def is_rows(data: str | Path) -> bool:
    """Whether `data` is rows to preprocess (a table or a folder), not an .npz of ready inputs
    (any other file is read as one, and refused as one when it is not)."""
    data = Path(data)
    return data.is_dir() or data.suffix.lower() in (*TABLE_SUFFIXES, ".txt")


def source_rows(data: str | Path, source, options: DataOptions,
                say: Callable[[str], None] | None = None) -> NamedInputs:
    """Rows for a loaded model source (exporters.ModelSource): a Hugging Face folder's own
    tokenizer or image processor, which its export also writes into the model file."""
    pre = source.meta.get("preprocess")
    return read_for_model(data, Preprocess.from_json(pre) if pre else None, source.origin, options, say)
