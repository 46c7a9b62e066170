"""Pipeline config: typed sections loaded from TOML, validated on construction."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgepipe.errors import ConfigError
from edgepipe.pipeline.settings import Budgets, ProfileConfig

STAGES = ("train", "prune", "export", "quantize", "profile")


@dataclass
class ModelConfig:
    name: str  # zoo model name (mlp, cnn, lstm, transformer) or a label for `source`
    dataset: str | None = None  # bundled dataset name, .npz, or rows (CSV, JSONL, Parquet, folder)
    # checkpoint or file.py:factory (training skipped), or a Hugging Face folder (fine-tuned by
    # train and pruned by prune when `dataset` is labelled rows, else exported as it is)
    source: str | None = None
    task: str | None = None  # Hugging Face folders: the head (default: from config.json)
    inputs: list[str] = field(default_factory=list)  # for sources without declared inputs
    sections: dict[str, Any] = field(default_factory=dict)  # merged per-stage settings

    @property
    def hf_folder(self) -> bool:
        return bool(self.source) and Path(self.source).is_dir()

    @property
    def causal_lm(self) -> bool:
        """A Hugging Face causal language model folder: trained on text, exported as a decoder."""
        from edgepipe.models.hf import is_causal_lm_folder

        return self.hf_folder and is_causal_lm_folder(Path(self.source))

    @property
    def fine_tunes(self) -> bool:
        """A Hugging Face folder with labelled rows: the train stage fine-tunes it on them."""
        from edgepipe.data.for_model import is_rows

        return self.hf_folder and bool(self.dataset) and is_rows(Path(self.dataset))


@dataclass
class PipelineConfig:
    out_dir: Path
    stages: tuple[str, ...]
    models: list[ModelConfig]
    seed: int = 0
    raw: dict[str, Any] = field(default_factory=dict)

    def digest(self, *parts: Any) -> str:
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_type(hint: Any) -> str:
    """What a TOML value of type `hint` must look like, in words."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint):
        return describe_type(args[0]) + " (or leave the key out)"
    if typing.get_origin(hint) is dict:
        return f"a table of {describe_type(args[1]).split(' ', 1)[1]}s"
    if typing.get_origin(hint) is tuple:
        return f"a list of {describe_type(args[0]).split(' ', 1)[1]}s" if args else "a list"
    return names.get(hint, str(hint))


def check_value(key: str, value: Any, hint: Any) -> tuple[Any, str | None]:
    """(`value` as `hint`, None), or (None, why) naming the key, the value and what is expected.
    Strict: "12" is not an integer and true is not a number."""
    from pydantic import TypeAdapter, ValidationError

    value = tuple(value) if isinstance(value, list) else value
    try:
        return TypeAdapter(hint).validate_python(value, strict=True), None
    except ValidationError:
        return None, f"{key} = {value!r} is not {describe_type(hint)}"


def build_section(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from a TOML table: unknown keys, values of the wrong type and
    values out of range are all refused here, before any work, each naming its key."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    hints = typing.get_type_hints(cls)
    values, problems = {}, []
    for key, value in data.items():
        if key in known:
            values[key], problem = check_value(key, value, hints[key])
            problems += [problem] if problem else []
    if unknown or problems:
        raise ConfigError("; ".join(
            [f"unknown key(s) {', '.join(unknown)} in [{where}]; known: {', '.join(sorted(known))}"] * bool(unknown)
            + [f"[{where}] " + "; ".join(problems)] * bool(problems)))
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"[{where}] {exc}") from None


def stage_configs(model: ModelConfig, seed: int) -> dict[str, Any]:
    """Typed configs for every stage of `model` (global sections with the model's overrides)."""
    from edgepipe.exporters import ExportConfig
    from edgepipe.models.finetune import FinetuneConfig
    from edgepipe.models.mlm import PretrainConfig
    from edgepipe.models.training import TrainConfig
    from edgepipe.prune import PruneConfig
    from edgepipe.quantize import DecoderQuantizeConfig, QuantizeConfig

    lm = model.causal_lm  # trained on text (PretrainConfig), quantized by the decoder search
    quantize = DecoderQuantizeConfig if lm else QuantizeConfig
    classes = {"train": PretrainConfig if lm else FinetuneConfig if model.hf_folder else TrainConfig,
               "prune": PruneConfig, "export": ExportConfig, "quantize": quantize, "profile": ProfileConfig,
               "budgets": Budgets}
    out, problems = {}, []
    for section, cls in classes.items():
        data = dict(model.sections.get(section, {}))
        if section in ("train", "prune"):
            data.setdefault("seed", seed)
        if section == "prune" and model.hf_folder:  # cut once, then recovered by distillation
            data.setdefault("steps", 1)
            data.setdefault("lr", 1e-4)
        if section == "quantize" and "max_accuracy_drop" not in data and not lm:
            # The quantize stage searches inside the same accuracy budget the gate checks.
            drop = model.sections.get("budgets", {}).get("max_accuracy_drop", Budgets.max_accuracy_drop)
            if drop is not None:
                data["max_accuracy_drop"] = drop
        try:
            out[section] = build_section(cls, data, f"{model.name}.{section}")
        except ConfigError as exc:  # every section's problems at once
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    device, providers = getattr(out["quantize"], "device", "cpu"), out["profile"].providers
    if device != "cpu" and providers not in ("auto", device):
        raise ConfigError(f"[{model.name}] quantize device = '{device}' measures the model on the GPU, but profile "
                          f"providers = '{providers}' would time and gate it there; set [profile] providers = "
                          f"'{device}' (or 'auto')")
    return out


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


TOP_LEVEL = {"out_dir": str, "seed": int, "stages": tuple[str, ...], "models": tuple[dict, ...]}
MODEL_KEYS = {"name": str, "dataset": str, "source": str, "task": str, "inputs": tuple[str, ...]}
SECTIONS = ("train", "prune", "export", "quantize", "profile", "budgets")


def _checked(table: dict[str, Any], types: dict[str, Any], where: str) -> dict[str, Any]:
    """`table`'s keys of `types` checked for type; every problem named at once."""
    checked, problems = {}, []
    for key, hint in types.items():
        if key in table:
            checked[key], problem = check_value(key, table[key], hint)
            problems += [problem] if problem else []
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return checked


def _resolve_path(key: str, value: str, base_dir: Path, where: str) -> str:
    """A file path in the config, relative to the config file; it must exist."""
    if key == "source" and not (value.endswith((".npz", ".pt", ".pth")) or ".py:" in value):
        folder = Path(value) if Path(value).is_absolute() else base_dir / value
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{where}: source = {value!r} is neither a checkpoint (.pt), a file.py:factory "
                              f"nor a Hugging Face model folder with config.json ({folder}; paths are relative "
                              "to the config file)")
        return str(folder)
    if key == "dataset" and _is_rows(value, base_dir):  # a table or a folder of the user's rows
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.exists():
            raise ConfigError(f"{where}: dataset = {value!r}: not found ({path}; paths are relative to the "
                              "config file)")
        return str(path)
    if not (value.endswith((".npz", ".pt", ".pth")) or ".py:" in value):
        return value  # a bundled dataset's name
    file_part, sep, factory = value.partition(":") if ".py:" in value else (value, "", "")
    path = Path(file_part) if Path(file_part).is_absolute() else base_dir / file_part
    if not path.is_file():
        raise ConfigError(f"{where}: {key} = {value!r}: file not found ({path}; paths are relative to the "
                          "config file)")
    return str(path) + sep + factory


def _is_rows(value: str, base_dir: Path) -> bool:
    from edgepipe.data.for_model import is_rows

    return is_rows(Path(value) if Path(value).is_absolute() else base_dir / value)


def _model(i: int, entry: dict, shared: dict, base_dir: Path, stages: tuple, seed: int) -> ModelConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"[[models]] entry {i + 1} must be a table, got {entry!r}")
    entry = dict(entry)
    if "name" not in entry:
        raise ConfigError(f"[[models]] entry {i + 1} has no name")
    where = f"[[models]] '{entry['name']}'"
    sections = {k: _merge(shared[k], entry.pop(k, {})) for k in shared}
    extra = sorted(set(entry) - set(MODEL_KEYS))
    if extra:
        raise ConfigError(f"unknown key(s) {', '.join(extra)} in {where}; known: {', '.join(MODEL_KEYS)}")
    entry = _checked(entry, MODEL_KEYS, where)
    for key in ("dataset", "source"):
        if entry.get(key):
            entry[key] = _resolve_path(key, entry[key], base_dir, where)
    if entry.get("task") and not (entry.get("source") and Path(entry["source"]).is_dir()):
        raise ConfigError(f"{where}: task applies only to a Hugging Face folder as source")
    model = ModelConfig(name=entry["name"], dataset=entry.get("dataset"), source=entry.get("source"),
                        task=entry.get("task"),
                        inputs=list(entry.get("inputs", ())), sections=sections)
    if model.causal_lm and ("prune" in stages or (model.dataset and Path(model.dataset).suffix != ".txt")):
        raise ConfigError(f"{where}: {model.source} is a causal language model: its stages are train (on `dataset`, a "
                          ".txt file), export, quantize and profile; it is not pruned")
    if model.hf_folder and "prune" in stages and not model.fine_tunes:
        raise ConfigError(f"{where}: pruning the folder {model.source} needs labelled rows as `dataset` (CSV, JSONL, "
                          "Parquet, an image folder) to rank, recover and judge it")
    if model.source is None and "train" in stages:
        from edgepipe.models.zoo import DEFAULT_DATASET, ZOO

        if model.name not in ZOO:
            raise ConfigError(f"model '{model.name}' is not in the zoo ({', '.join(ZOO)}); "
                              "give it a `source` (checkpoint or file.py:factory)")
        model.dataset = model.dataset or DEFAULT_DATASET[model.name]
    stage_configs(model, seed)  # validate every section now, not mid-run
    return model


def from_dict(data: dict[str, Any], base_dir: Path = Path(".")) -> PipelineConfig:
    """A validated PipelineConfig: every key, type, range and file path is checked here, before
    any stage runs; each error names its key, its value and what is expected."""
    problems: list[str] = []  # every problem of the file, refused at once

    def checked(check, *args):
        try:
            return check(*args)
        except ConfigError as exc:
            problems.append(str(exc))
            return None

    known = {*TOP_LEVEL, *SECTIONS}
    unknown = sorted(set(data) - known)
    if unknown:
        problems.append(f"unknown top-level key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    top = checked(_checked, data, TOP_LEVEL, "config") or {}
    for section in SECTIONS:
        if not isinstance(data.get(section, {}), dict):
            problems.append(f"config: [{section}] must be a table, got {data[section]!r}")
    stages = top.get("stages", STAGES)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        problems.append(f"unknown stage(s) {', '.join(bad)}; stages are {', '.join(STAGES)}")
    if "models" not in data:
        problems.append("config lists no [[models]]; add at least one, e.g. [[models]] name = \"mlp\"")
    shared = {k: data[k] if isinstance(data.get(k), dict) else {} for k in SECTIONS}
    seed = top.get("seed", 0)
    models = [checked(_model, i, entry, shared, base_dir, stages, seed)
              for i, entry in enumerate(top.get("models", ()))]
    names = [m.name for m in models if m is not None]
    if len(set(names)) != len(names):
        problems.append(f"model names must be unique, got {names}")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))
    out_dir = Path(top.get("out_dir", "runs/edgepipe"))
    return PipelineConfig(out_dir=out_dir if out_dir.is_absolute() else base_dir / out_dir,
                          stages=stages, models=models, seed=seed, raw=data)


def load(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline config not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return from_dict(data, base_dir=path.parent)


def demo_config(out_dir: str | Path = "runs/demo") -> PipelineConfig:
    """The built-in config `edgepipe demo` runs: the whole zoo on embedded data."""
    data = tomllib.loads(resources.files("edgepipe.pipeline").joinpath("demo.toml").read_text())
    data["out_dir"] = str(out_dir)
    return from_dict(data, base_dir=Path.cwd())
