"""Input specs: name, dtype and shape (with named dynamic dims) of a model input, torch-free."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from edgepipe.errors import InputError

# ORT type strings -> numpy dtypes (the subset models in the field use as inputs/outputs).
ORT_TO_NUMPY = {
    "tensor(float)": np.dtype("float32"),
    "tensor(float16)": np.dtype("float16"),
    "tensor(double)": np.dtype("float64"),
    "tensor(int64)": np.dtype("int64"),
    "tensor(int32)": np.dtype("int32"),
    "tensor(int16)": np.dtype("int16"),
    "tensor(int8)": np.dtype("int8"),
    "tensor(uint8)": np.dtype("uint8"),
    "tensor(bool)": np.dtype("bool"),
}

METADATA_KEY = "edgepipe.inputs"  # ONNX metadata_props key holding the export spec as JSON


@dataclass(frozen=True)
class InputSpec:
    """One model input. `shape` entries are ints (static) or names (dynamic, e.g. "batch").

    `low`/`high` bound generated integer inputs (token ids: high = vocabulary size);
    `example` gives the size used for a named dim when none is asked for.
    `vocab`: the model accepts only integers in [0, vocab) here (token ids: the vocabulary size;
    an attention mask: 2); `max_dims`: the largest size a named dim may take (the sequence: the
    model's position embeddings). Both come from the model's own config and are checked on every
    run; None/empty where unknown.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    low: float | None = None
    high: float | None = None
    example: Mapping[str, int] = field(default_factory=dict)
    vocab: int | None = None
    max_dims: Mapping[str, int] = field(default_factory=dict)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def dynamic_dims(self) -> dict[int, str]:
        return {axis: dim for axis, dim in enumerate(self.shape) if isinstance(dim, str)}

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"'{self.name}' {self.dtype}[{dims}]"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["example"] = dict(self.example)
        data["max_dims"] = dict(self.max_dims)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InputSpec":
        return cls(
            name=str(data["name"]),
            dtype=str(np.dtype(data["dtype"])),
            shape=tuple(data["shape"]),
            low=data.get("low"),
            high=data.get("high"),
            example=dict(data.get("example") or {}),
            vocab=data.get("vocab"),
            max_dims=dict(data.get("max_dims") or {}),
        )

    @classmethod
    def parse(cls, text: str) -> "InputSpec":
        """Parse the CLI form `name:dtype:dim,dim,...[:low..high]`, e.g. `ids:int64:batch,seq:0..1000`."""
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise InputError(
                f"cannot parse input spec '{text}': expected name:dtype:dims[:low..high], "
                "e.g. x:float32:batch,1,8,8 or ids:int64:batch,seq:0..1000"
            )
        name, dtype, dims = parts[:3]
        try:
            np_dtype = np.dtype(dtype)
        except TypeError:
            raise InputError(f"input spec '{text}': unknown dtype '{dtype}'") from None
        shape = tuple(int(d) if d.strip().isdigit() else d.strip() for d in dims.split(","))
        low = high = None
        if len(parts) == 4:
            try:
                low_text, high_text = parts[3].split("..")
                low, high = float(low_text), float(high_text)
            except ValueError:
                raise InputError(f"input spec '{text}': range must be low..high, e.g. 0..1000") from None
        return cls(name=name, dtype=str(np_dtype), shape=shape, low=low, high=high)


def specs_to_json(specs: Sequence[InputSpec]) -> str:
    return json.dumps([spec.to_dict() for spec in specs])


def specs_from_json(text: str) -> list[InputSpec]:
    return [InputSpec.from_dict(item) for item in json.loads(text)]


def dynamic_sizes(specs: Sequence[InputSpec], dims: Mapping[str, int] | None = None) -> dict[str, int]:
    """The size each named dynamic dim other than "batch" gets: `dims`, else the export's example
    size, else 16. Profiles record these: a latency means nothing without its sequence length."""
    dims = dict(dims or {})
    sizes: dict[str, int] = {}
    for spec in specs:
        for name in spec.dynamic_dims.values():
            if name != "batch" and name not in sizes:
                sizes[name] = int(dims.get(name, spec.example.get(name, 16)))
    unknown = sorted(set(dims) - set(sizes) - {"batch"})
    if unknown:
        raise InputError(f"no dynamic dim named {', '.join(unknown)}; the model's are "
                         f"{', '.join(sizes) or 'none besides batch'}")
    return sizes


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    """["seq=128"] -> {"seq": 128}."""
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"--dim '{item}' must be NAME=SIZE with a positive size, e.g. seq=128")
        dims[name.strip()] = int(value)
    return dims


def make_feeds(
    specs: Sequence[InputSpec],
    batch: int,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Generate seeded inputs matching `specs`: `batch` for the dim named "batch", then `dims`,
    then each spec's example sizes (default 16) for other named dims."""
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, **(dims or {})}
    feeds = {}
    for spec in specs:
        shape = []
        for dim in spec.shape:
            if isinstance(dim, int):
                shape.append(dim)
            else:
                shape.append(int(sizes.get(dim, spec.example.get(dim, 16))))
        dtype = spec.np_dtype
        if dtype.kind == "b":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif dtype.kind in "iu":
            low = int(spec.low) if spec.low is not None else 0
            high = int(spec.high) if spec.high is not None else 2
            feeds[spec.name] = rng.integers(low, high, size=shape).astype(dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def specs_from_session(session, metadata: Mapping[str, str]) -> list[InputSpec]:
    """Input specs of an ORT session's graph, enriched by the export metadata (value ranges, example dims)."""
    recorded = {}
    if METADATA_KEY in metadata:
        recorded = {s.name: s for s in specs_from_json(metadata[METADATA_KEY])}
    specs = []
    for arg in session.get_inputs():
        dtype = ORT_TO_NUMPY.get(arg.type)
        if dtype is None:
            raise InputError(f"model input '{arg.name}' has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) else (d or f"dim{i}") for i, d in enumerate(arg.shape))
        extra = recorded.get(arg.name)
        specs.append(InputSpec(
            name=arg.name, dtype=str(dtype), shape=shape,
            low=extra.low if extra else None, high=extra.high if extra else None,
            example=extra.example if extra else {},
            vocab=extra.vocab if extra else None, max_dims=extra.max_dims if extra else {},
        ))
    return specs
