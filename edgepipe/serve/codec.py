"""Request bodies -> validated feeds, shared by every server front end (FastAPI, Ray Serve)."""

from __future__ import annotations

import io
import json

import numpy as np

from edgepipe.errors import InputError
from edgepipe.runtime.engine import Engine

try:  # several times faster than the json module on arrays of numbers; optional
    import orjson
except ImportError:  # pragma: no cover - orjson ships with the serve extra
    orjson = None

NPY = "application/x-npy"
JSON = "application/json"
_MAGIC = b"\x93NUMPY"
# .npy headers seen before -> (shape, fortran order, dtype): a server sees the same few shapes
# again and again, and parsing the header (a Python literal) costs more than the inference of
# a small model. Bounded, so hostile clients cannot grow it.
_HEADERS: dict[bytes, tuple] = {}
_OUT_HEADERS: dict[tuple, bytes] = {}
_CACHE_LIMIT = 256


def read_npy(body: bytes) -> np.ndarray:
    """A .npy body as a read-only array over the body's bytes (no pickles, size checked)."""
    if body[:6] != _MAGIC or len(body) < 10:
        raise InputError("body is not a valid .npy array (no NUMPY magic)")
    major = body[6]
    start = 10 if major == 1 else 12
    header_len = int.from_bytes(body[8:start], "little")
    header = body[start:start + header_len]
    info = _HEADERS.get(header)
    if info is None:
        try:
            stream = io.BytesIO(body)
            version = np.lib.format.read_magic(stream)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(stream)
        except Exception:
            raise InputError("body is not a valid .npy array (bad header)") from None
        if dtype.hasobject:
            raise InputError("object arrays are not accepted in .npy bodies")
        info = (shape, fortran, dtype)
        if len(_HEADERS) < _CACHE_LIMIT:
            _HEADERS[header] = info
    shape, fortran, dtype = info
    offset = start + header_len
    count = int(np.prod(shape, dtype=np.int64))
    if len(body) - offset != count * dtype.itemsize:
        raise InputError(f".npy body holds {len(body) - offset} data bytes, its header says "
                         f"{list(shape)} {dtype} = {count * dtype.itemsize}")
    return np.frombuffer(body, dtype, count, offset).reshape(shape, order="F" if fortran else "C")


def write_npy(array: np.ndarray) -> bytes:
    """np.save's bytes for a C-contiguous array, with the header built once per dtype/shape."""
    array = np.ascontiguousarray(array)
    key = (array.dtype.str, array.shape)
    header = _OUT_HEADERS.get(key)
    if header is None:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(array))
        header = buffer.getvalue()
        if len(_OUT_HEADERS) < _CACHE_LIMIT:
            _OUT_HEADERS[key] = header
    return header + array.tobytes()


class TextIn:
    """Raw text requests for a classifier whose file carries its tokenizer: {"text": "..."} or
    {"text": [...], "text_pair": [...]} -> token feeds, and logits -> label names. Rows are padded
    to a multiple of PAD_MULTIPLE tokens, so requests of similar length batch together."""

    PAD_MULTIPLE = 16

    def __init__(self, engine: Engine):
        from edgepipe.runtime.preprocess import TEXT, Preprocess

        pre = Preprocess.from_metadata(engine.metadata)
        self.engine, self.pre = engine, pre if pre is not None and pre.kind == TEXT else None
        self._encoder = None

    def feeds(self, data: dict) -> tuple[dict[str, np.ndarray], bool]:
        """(feeds, whether the request sent a single text)."""
        from edgepipe.runtime.preprocess import TextEncoder

        if self.pre is None:
            raise InputError("this model takes no text (its file carries no tokenizer): send "
                             "{\"inputs\": {\"<name>\": [...]}}")
        texts, pairs = data.get("text"), data.get("text_pair")
        single = isinstance(texts, str)
        texts = [texts] if single else texts
        pairs = [pairs] if isinstance(pairs, str) else pairs
        if not texts or not all(isinstance(t, str) for t in texts) or (
                pairs is not None and (len(pairs) != len(texts) or not all(isinstance(p, str) for p in pairs))):
            raise InputError("\"text\" must be a string or a non-empty list of strings (and \"text_pair\", "
                             "when given, one string per text)")
        if self.pre.per_word:
            raise InputError("this model tags each word (token classification), which text requests do not "
                             "serve yet: send its token inputs as {\"inputs\": {\"<name>\": [...]}}")
        self._encoder = self._encoder or TextEncoder(self.pre)
        rows = self._encoder.token_rows(texts, pairs)
        longest = max(len(r["input_ids"]) for r in rows)
        length = -(-longest // self.PAD_MULTIPLE) * self.PAD_MULTIPLE
        return self._encoder.pad(rows, min(length, self.pre.max_length or length)), single

    def labels(self, outputs: dict[str, np.ndarray], single: bool) -> bytes:
        from edgepipe.runtime.preprocess import softmax

        probs = softmax(outputs[self.engine.output_names[0]].astype(np.float64))
        rows = [{"label": self.pre.label_name(int(p.argmax())), "id": int(p.argmax()),
                 "score": round(float(p.max()), 6)} for p in probs]
        return json.dumps(rows[0] if single else {"labels": rows}).encode()


def parse_request(engine: Engine, text: TextIn | None, body: bytes,
                  content_type: str) -> tuple[dict[str, np.ndarray], bool | None]:
    """(feeds, None) for tensor requests (parse_body); (feeds, single) for a text request."""
    if text is not None and not content_type.startswith(NPY):
        data = _loads(body)
        if isinstance(data, dict) and "text" in data and "inputs" not in data:
            feeds, single = text.feeds(data)
            engine.validate(feeds)
            return feeds, single
        return parse_body(engine, body, content_type, parsed=data), None
    return parse_body(engine, body, content_type), None


def parse_body(engine: Engine, body: bytes, content_type: str, parsed=None) -> dict[str, np.ndarray]:
    """JSON {"inputs": {name: nested list}} (or {name: ...}), cast to the model's dtypes; or a
    raw .npy array for single-input models (dtype must match). Non-finite floats are refused.
    `parsed`: the JSON body, already decoded."""
    if content_type.startswith(NPY):
        if len(engine.inputs) != 1:
            raise InputError(f"npy bodies need a single-input model; this one takes "
                             f"{', '.join(s.name for s in engine.inputs)}: send JSON")
        array = read_npy(body)
        feeds = {engine.inputs[0].name: array}
    else:
        data = _loads(body) if parsed is None else parsed
        data = data.get("inputs", data) if isinstance(data, dict) else None
        if not isinstance(data, dict):
            raise InputError("JSON body must be an object: {\"inputs\": {\"<name>\": [...]}}")
        missing = [s for s in engine.inputs if s.name not in data]
        unknown = sorted(set(data) - {s.name for s in engine.inputs})
        if missing or unknown:
            raise InputError("; ".join(
                [f"unknown input(s) {', '.join(map(repr, unknown))}"] * bool(unknown)
                + [f"missing input '{s.name}' (expected {s.describe()})" for s in missing]))
        feeds = {spec.name: _as_array(data[spec.name], spec) for spec in engine.inputs}
    for name, array in feeds.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError(f"input '{name}' contains NaN or infinity")
    engine.validate(feeds)
    return feeds


def _as_array(value, spec) -> np.ndarray:
    """A JSON value as an array of the input's dtype. Numbers with a fraction are refused for an
    integer input (token ids): casting would truncate 1.5 to 1 and answer for another input."""
    try:
        array = np.asarray(value)
        if array.dtype.kind == "f" and spec.np_dtype.kind in "iu":
            if not np.isfinite(array).all():
                raise InputError(f"input '{spec.name}' contains NaN or infinity")
            fraction = array[array != np.round(array)]
            if fraction.size:
                raise InputError(f"input '{spec.name}' holds {fraction.flat[0]:g}, not an integer: "
                                 f"it takes {spec.dtype} values")
        if array.dtype.kind not in "biuf" and array.size:
            raise TypeError
        return array.astype(spec.np_dtype)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"input '{spec.name}' is not a rectangular array of {spec.dtype}") from None


def _loads(body: bytes):
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # NaN/Infinity literals, or broken JSON: the standard parser tells which
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("body is not valid JSON (send {\"inputs\": {\"<name>\": [...]}})") from None


def encode_outputs(outputs: dict[str, np.ndarray], accept: str) -> tuple[bytes, str]:
    """A raw .npy body when the client accepts it and there is one output, else the JSON object
    {"outputs": {name: nested list}}. Returns (body, media type)."""
    if NPY in accept and len(outputs) == 1:
        return write_npy(next(iter(outputs.values()))), NPY
    if orjson is not None:
        return orjson.dumps({"outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY), JSON
    return json.dumps({"outputs": {k: v.tolist() for k, v in outputs.items()}}, separators=(",", ":")).encode(), JSON
