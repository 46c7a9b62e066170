"""Causal language models: a Hugging Face folder (config.json + weights) -> an ONNX decoder whose
KV cache is a flat list of inputs and outputs (past.{i}.key/value -> present.{i}.key/value),
exported with torch.onnx (dynamo) and checked by a parity verdict on the prefill of two prompt
lengths and on greedy decode steps with the cache (logits, and the tokens chosen).

One graph serves both phases: the prefill feeds a past of length 0. runtime/generate.py runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import torch

from edgepipe import interrupts, onnxfile
from edgepipe.artifacts import StageResult
from edgepipe.errors import ExportError, InputError, ParityError, first_line
from edgepipe.exporters.failures import error_line
from edgepipe.exporters.report import ExportReport
from edgepipe.models.hf import is_causal_lm, is_hf_folder, read_config
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.generate import DECODER_KEY, TOKENIZER_KEY, DecoderSpec
from edgepipe.runtime.spec import METADATA_KEY, InputSpec, specs_to_json


def load_causal_lm(folder: str | Path):
    """The model of a causal LM folder, in FP32 and eval mode, loaded offline."""
    folder = Path(folder)
    if not is_hf_folder(folder):
        raise InputError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = read_config(folder)
    if not is_causal_lm(config):
        raise InputError(f"{folder} is not a causal language model (architectures: "
                         f"{', '.join(config.get('architectures') or []) or 'none'}); a decoder needs a "
                         "*ForCausalLM model")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                                  dtype=torch.float32, attn_implementation="eager")
    except Exception as exc:  # unsupported architecture, corrupt safetensors, missing weights ...
        interrupts.reraise()  # a termination, not this call's failure
        raise InputError(f"{folder}: transformers cannot load it as a causal LM: {first_line(exc)[:300]}") from exc
    return model.eval()


def decoder_spec(model) -> DecoderSpec:
    config = model.config
    heads = config.num_attention_heads
    eos = config.eos_token_id
    return DecoderSpec(
        layers=config.num_hidden_layers, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab_size=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None) or 2048,
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        architecture=(config.architectures or [type(model).__name__])[0])


class FlatCache(torch.nn.Module):
    """The model with its cache as tensors: forward(input_ids, attention_mask, *past) ->
    (logits, *present), past/present ordered layer by layer, key then value."""

    def __init__(self, model, spec: DecoderSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.spec.layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _export(wrapper: FlatCache, spec: DecoderSpec, path: Path, tokenizer: Path | None = None) -> None:
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    example_past = [torch.zeros(2, spec.kv_heads, 3, spec.head_dim) for _ in range(2 * spec.layers)]
    example = (torch.randint(0, spec.vocab_size, (2, 4)), torch.ones(2, 7, dtype=torch.int64), *example_past)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past} for _ in example_past))
    large = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > onnxfile.EXTERNAL_BYTES
    program = torch.onnx.export(wrapper, example, dynamo=True, dynamic_shapes=shapes, verbose=False,
                                input_names=["input_ids", "attention_mask", *spec.past_names()],
                                output_names=["logits", *spec.present_names()], external_data=large)
    program.save(str(path), external_data=large)
    model = onnx.load(str(path))
    attach_metadata(model, spec, tokenizer)
    onnxfile.save(model, path)
    onnx.checker.check_model(str(path))


def attach_metadata(model: onnx.ModelProto, spec: DecoderSpec, tokenizer: Path | None) -> None:
    """What edgepipe's runtime reads from a decoder file: its DecoderSpec, its input specs and,
    when the folder had one, its tokenizer."""
    # Generated inputs (profile, compare) must be a consistent step: a 16-token prefill with an
    # empty cache, so total = past + seq holds (--dim seq=N needs --dim total=N with it).
    inputs = [InputSpec("input_ids", "int64", ("batch", "seq"), 0, spec.vocab_size, {"seq": 16}),
              InputSpec("attention_mask", "int64", ("batch", "total"), 1, 2, {"total": 16}),
              *[InputSpec(name, "float32", ("batch", spec.kv_heads, "past", spec.head_dim), example={"past": 0})
                for name in spec.past_names()]]
    entries = [(DECODER_KEY, spec.to_json()), (METADATA_KEY, specs_to_json(inputs))]
    if tokenizer is not None and tokenizer.exists():  # text in and out in the runtime, from one file
        entries.append((TOKENIZER_KEY, tokenizer.read_text()))
    for key, value in entries:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.ir_version = min(model.ir_version, onnxfile.MAX_IR_VERSION)


def decoder_parity(model, path: Path, spec: DecoderSpec, prompt_lengths=(5, 11), steps: int = 16,
                   atol: float = 1e-3, rtol: float = 1e-3, seed: int = 0) -> dict:
    """ONNX Runtime against torch: the prefill of each prompt length, then `steps` greedy decode
    steps with the cache, each side feeding its own tokens back. Passes when every logit is
    within tolerance and both chose the same tokens."""
    engine = Engine(path, providers="cpu")
    rng = np.random.default_rng(seed)
    cases = []
    for length in prompt_lengths:
        prompt = rng.integers(0, spec.vocab_size, (1, length))
        empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), dtype=np.float32)
        past = {name: empty for name in spec.past_names()}
        ids_o = ids_t = prompt
        cache_t, total, worst, tokens_o, tokens_t = None, length, 0.0, [], []
        for step in range(steps + 1):
            out = engine.run({"input_ids": ids_o, "attention_mask": np.ones((1, total), np.int64), **past})
            with torch.no_grad():
                ref = model(input_ids=torch.from_numpy(ids_t), past_key_values=cache_t, use_cache=True)
            expected = ref.logits.numpy()
            error = np.abs(out["logits"] - expected)
            worst = max(worst, float(error.max()))
            if (error > atol + rtol * np.abs(expected)).any():
                cases.append({"prompt": length, "step": step, "ok": False, "max_abs_diff": worst})
                break
            tokens_o.append(int(out["logits"][0, -1].argmax()))
            tokens_t.append(int(ref.logits[0, -1].argmax()))
            past = {p: out[q] for p, q in zip(spec.past_names(), spec.present_names())}
            cache_t, total = ref.past_key_values, total + 1
            ids_o, ids_t = np.asarray([[tokens_o[-1]]]), np.asarray([[tokens_t[-1]]])
        else:
            cases.append({"prompt": length, "steps": steps, "ok": tokens_o == tokens_t, "max_abs_diff": worst,
                          "same_tokens": tokens_o == tokens_t})
    return {"atol": atol, "rtol": rtol, "cases": cases, "ok": all(c["ok"] for c in cases)}


def export_decoder(folder: str | Path, out_path: str | Path, *, atol: float = 1e-3, rtol: float = 1e-3,
                   steps: int = 16, route: str = "auto") -> StageResult:
    """Stage: causal LM folder -> ONNX decoder with KV cache, proven by decoder_parity.
    `route`: "dynamo" (torch.onnx of the model itself), "genai" (ONNX Runtime GenAI's model
    builder, fused operators) or "auto" (both, without the genai extra dynamo alone; of those
    that pass parity, the faster per output token: _choose). Every route tried is recorded, with
    why it was not kept."""
    from edgepipe.exporters.genai_route import ROUTES, build_genai, genai_installed

    if route not in ROUTES:
        raise InputError(f"unknown decoder route '{route}'; choose one of {', '.join(ROUTES)}")
    model = load_causal_lm(folder)
    spec = decoder_spec(model)
    tokenizer = Path(folder) / "tokenizer.json"
    out_path = Path(out_path)
    routes = ["dynamo", "genai"] if route == "auto" else [route]
    attempts: list[dict] = []
    with onnxfile.staged_model(out_path) as tmp:
        for name in routes:
            path = tmp.parent / f"{name}.onnx"
            attempt: dict = {"exporter": name, "ok": False}
            attempts.append(attempt)
            if name == "genai" and route == "auto" and not genai_installed():
                attempt["error"] = "onnxruntime-genai is not installed (pip install 'edgepipe[genai]')"
                continue
            started = time.perf_counter()
            with interrupts.attempt() as tried:  # a failed route is recorded; the next is tried
                if name == "dynamo":
                    _export(FlatCache(model, spec).eval(), spec, path, tokenizer)
                else:
                    build_genai(Path(folder), path, spec, lambda m: attach_metadata(m, spec, tokenizer))
            if tried.error is not None:
                exc = tried.error
                attempt["error"] = (f"{name} could not export {spec.architecture} with its KV cache: "
                                    f"{first_line(exc) if isinstance(exc, ExportError) else error_line(exc)}")
                continue
            attempt["seconds"] = round(time.perf_counter() - started, 2)
            attempt["parity"] = decoder_parity(model, path, spec, steps=steps, atol=atol, rtol=rtol)
            attempt["ok"] = attempt["parity"]["ok"]
            if attempt["ok"] and len(routes) > 1:
                attempt["tpot_ms"] = _time_per_token(path, spec)
                attempt |= _int4_time_per_token(path, spec)
        kept = _choose(attempts)
        if kept is None:
            failed = [a for a in attempts if "parity" in a]
            detail = "; ".join(f"{a['exporter']}: {a['parity']['cases']}" if "parity" in a else a["error"]
                               for a in attempts)
            if failed:
                raise ParityError(f"the ONNX decoder does not match torch: {detail}")
            raise ExportError(detail)
        onnxfile.commit(tmp.parent / f"{kept['exporter']}.onnx", tmp)
        graph = onnx.load(str(tmp), load_external_data=False)
        record = ExportReport(
            exporter=kept["exporter"], attempts=attempts, parity=kept["parity"],
            opset=max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            ir_version=graph.ir_version, size_bytes=onnxfile.model_bytes(tmp),
            inputs=[{"name": i.name} for i in graph.graph.input], outputs=[o.name for o in graph.graph.output],
            source=str(folder))
    return StageResult("export", {"onnx": out_path}, record)


def _time_per_token(path: Path, spec: DecoderSpec) -> float:
    from edgepipe.runtime.decoder_profile import time_per_token

    with Engine(path, providers="cpu") as engine:
        return round(time_per_token(engine, spec, 1, min(128, spec.max_positions - 1), seconds=1.0), 3)


def _int4_time_per_token(path: Path, spec: DecoderSpec) -> dict:
    """{"int4_tpot_ms": ...} of the graph's INT4 weight-only model (RTN, blocks of 128, INT8
    compute: what quantize builds first and ships most), or {"int4_error": why}. Once the weights
    shrink 4x, the ops between MatMuls weigh more: on a 0.34B Llama both routes ran FP32 at
    50.6-51.5 ms per token, and INT4 at 10.4 ms on the builder's fused graph, 13.3 ms traced."""
    from edgepipe.quantize import weight_only_int4

    int4 = path.with_name(path.stem + ".int4.onnx")
    try:
        with interrupts.attempt() as tried:  # failed, the choice falls back to FP32 speed alone
            weight_only_int4(path, int4, spec)
            return {"int4_tpot_ms": _time_per_token(int4, spec)}
        return {"int4_error": error_line(tried.error)}
    finally:
        for made in (int4, onnxfile.sidecar(int4)):
            made.unlink(missing_ok=True)


def _choose(attempts: list[dict]) -> dict | None:
    """The route kept: the only one that passed, or of two, genai when its graph is more than 5%
    faster per token in FP32 or in INT4 (weight-only, timed on both) and not more than 5% slower
    in either; else dynamo (within the noise of a short timing, the graph traced from the model
    itself is the one to trust)."""
    passed = {a["exporter"]: a for a in attempts if a["ok"]}
    if len(passed) < 2:
        return next(iter(passed.values()), None)
    dynamo, genai = passed["dynamo"], passed["genai"]
    ratios = {precision: dynamo[key] / genai[key] for precision, key in (("FP32", "tpot_ms"), ("INT4", "int4_tpot_ms"))
              if key in dynamo and key in genai}  # > 1: genai faster
    faster = any(r > 1.05 for r in ratios.values()) and all(r >= 1 / 1.05 for r in ratios.values())
    kept, other = (genai, dynamo) if faster else (dynamo, genai)
    kept["chosen_because"] = "; ".join(
        f"{precision} {kept[key]} ms per token against {other[key]} ms"
        for precision, key in (("FP32", "tpot_ms"), ("INT4", "int4_tpot_ms")) if key in kept and key in other
    ) + ("" if faster else " (genai not >5% faster at either, or >5% slower at one)")
    return kept
