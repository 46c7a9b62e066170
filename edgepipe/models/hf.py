"""Hugging Face model folders as export sources: what `save_pretrained` wrote (config.json plus
safetensors or .bin weights), read offline, with the task's model class and example inputs
derived from the config. transformers is imported only when such a folder is exported."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edgepipe import interrupts
from edgepipe.errors import InputError, first_line
from edgepipe.runtime.spec import InputSpec


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # transformers Auto* class that builds the model for this task
    modality: str  # "image" or "text"
    outputs: tuple[str, ...] | None  # ModelOutput keys to export (None: every tensor it returns)


TASKS = {t.name: t for t in (
    Task("image-classification", "AutoModelForImageClassification", "image", ("logits",)),
    Task("text-classification", "AutoModelForSequenceClassification", "text", ("logits",)),
    Task("token-classification", "AutoModelForTokenClassification", "text", ("logits",)),
    Task("fill-mask", "AutoModelForMaskedLM", "text", ("logits",)),
    Task("image-feature-extraction", "AutoModel", "image", None),
    Task("feature-extraction", "AutoModel", "text", None),
)}
CLASSIFIERS = ("image-classification", "text-classification")  # one label per row
TAGGER = "token-classification"  # one label per word
LABELLED = (*CLASSIFIERS, TAGGER)  # the tasks fine-tuning and labelled rows serve
# Suffixes of config.json's "architectures" entries, most specific first.
_ARCHITECTURE_TASKS = (
    ("ForImageClassification", "image-classification"),
    ("ForImageClassificationWithTeacher", "image-classification"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForMaskedLM", "fill-mask"),
)
_IMAGE_MODEL_TYPES = {"resnet", "mobilenet_v1", "mobilenet_v2", "vit", "deit", "convnext", "convnextv2",
                      "efficientnet", "regnet", "swin", "beit", "dinov2", "levit", "mobilevit", "poolformer"}
DEFAULT_SEQ = 128  # example sequence length (capped by the model's max positions)


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def is_causal_lm(config: dict) -> bool:
    """A config.json that names a causal LM head (*ForCausalLM, *LMHeadModel)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


def is_causal_lm_folder(path: str | Path) -> bool:
    return is_hf_folder(path) and is_causal_lm(read_config(Path(path)))


def folder_digest(folder: Path) -> str:
    """sha256 over the files a model is built from (config, weights, their index)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix in (".safetensors", ".bin") or path.name.endswith(".json")):
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder / 'config.json'} is not readable JSON: {exc}") from exc


def infer_task(config: dict[str, Any], folder: Path) -> str:
    """The task from the config's architectures (e.g. BertForSequenceClassification ->
    text-classification); a bare backbone (BertModel, ResNetModel) -> feature extraction."""
    architectures = config.get("architectures") or []
    for arch in architectures:
        for suffix, task in _ARCHITECTURE_TASKS:
            if arch.endswith(suffix):
                return task
    if architectures and all(a.endswith("Model") for a in architectures):
        return "image-feature-extraction" if config.get("model_type") in _IMAGE_MODEL_TYPES else "feature-extraction"
    raise InputError(f"{folder}: cannot tell the task from config.json (architectures: "
                     f"{', '.join(architectures) or 'none'}); pass --task ({', '.join(TASKS)})")


def input_specs(task: Task, config: Any, forward_params: set[str], image_side: int | None = None) -> list[InputSpec]:
    """Example inputs from the config: image size (else the image processor's, else 224) and
    channels, or vocabulary and positions."""
    if task.modality == "image":
        size = config.image_size if isinstance(getattr(config, "image_size", None), int) else image_side or 224
        channels = getattr(config, "num_channels", 3)
        return [InputSpec("pixel_values", "float32", ("batch", channels, size, size))]
    max_positions = getattr(config, "max_position_embeddings", None) or DEFAULT_SEQ
    example = {"seq": min(DEFAULT_SEQ, max_positions)}
    limit = {"seq": max_positions} if getattr(config, "max_position_embeddings", None) else {}
    specs = [InputSpec("input_ids", "int64", ("batch", "seq"), low=0, high=config.vocab_size, example=example,
                       vocab=config.vocab_size, max_dims=limit),
             InputSpec("attention_mask", "int64", ("batch", "seq"), low=1, high=2, example=example,
                       vocab=2, max_dims=limit)]
    if "token_type_ids" in forward_params and getattr(config, "type_vocab_size", 0):
        specs.append(InputSpec("token_type_ids", "int64", ("batch", "seq"), low=0, high=1, example=example,
                               vocab=config.type_vocab_size, max_dims=limit))
    return specs


class KeywordInputs(nn.Module):
    """Calls a Hugging Face model with its inputs by name (their positional order differs
    between architectures) and returns its ModelOutput restricted to the task's outputs."""

    def __init__(self, model: nn.Module, names: list[str], outputs: tuple[str, ...] | None):
        super().__init__()
        self.model, self.names, self.outputs = model, names, outputs

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)), return_dict=True)
        if self.outputs is None:
            return out
        return {k: out[k] for k in self.outputs}


def load_folder(folder: str | Path, task: str | None = None):
    """(module, input specs, origin, meta) for a save_pretrained folder, loaded offline."""
    import inspect

    folder = Path(folder)
    raw = read_config(folder)
    task_name = task or infer_task(raw, folder)
    if task_name not in TASKS:
        raise InputError(f"unknown task '{task_name}'; choose {', '.join(TASKS)}")
    spec = TASKS[task_name]
    try:
        import transformers
    except ImportError:
        raise InputError(f"{folder} is a Hugging Face model folder: install transformers "
                         "(pip install \"edgepipe[hf]\") to export it") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    auto = getattr(transformers, spec.auto_class)
    from edgepipe.models import hf_pruned

    if hf_pruned.is_pruned(folder):
        model = hf_pruned.load(auto, folder)
    else:
        model = _from_pretrained(auto, folder, task_name)
    model.eval()
    params = set(inspect.signature(model.forward).parameters)
    from edgepipe.models.hf_preprocess import processor_size

    specs = input_specs(spec, model.config, params, processor_size(folder) if spec.modality == "image" else None)
    meta = {"hf": {"task": task_name, "model_type": raw.get("model_type"),
                   "architectures": raw.get("architectures"), "transformers": transformers.__version__,
                   "parameters": sum(p.numel() for p in model.parameters())}}
    if task_name in LABELLED:  # the file carries what turns raw rows into its inputs
        from edgepipe.models.hf_preprocess import folder_preprocess

        pre = folder_preprocess(folder, spec.modality, [s.name for s in specs], raw, task_name == TAGGER)
        if pre is not None:
            meta["preprocess"] = pre.to_json()
    return KeywordInputs(model, [s.name for s in specs], spec.outputs), specs, str(folder), meta


def _from_pretrained(auto, folder: Path, task_name: str) -> nn.Module:
    try:
        return auto.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager")
    except Exception as exc:  # unsupported architecture, corrupt safetensors (SafetensorError), missing weights
        interrupts.reraise()
        raise InputError(f"{folder}: transformers cannot build a {task_name} model from it: "
                         f"{first_line(exc)[:300]}") from exc
