"""Users' own data in the formats they have, turned into model inputs by the model's own
tokenizer or image processor."""

from edgepipe.data.labelled import load_labelled
from edgepipe.data.rows import data_format, iter_rows

__all__ = ["data_format", "iter_rows", "load_labelled"]
