"""How a decoder step runs with its KV cache, per backend and device: feeds -> (logits, presents).

The presents of one step are the next step's past. On onnxruntime they stay OrtValues, fed back
without a copy through numpy; on a GPU, IO binding keeps them in device memory.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgepipe import interrupts
from edgepipe.errors import InputError, first_line

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
Runner = Callable[[dict], tuple[np.ndarray, list]]


def cache_runner(engine, spec) -> Runner:
    names = ["logits", *spec.present_names()]
    if engine.backend != "onnxruntime":
        def run_numpy(feeds):
            out = engine.run(feeds)
            return out["logits"], [out[n] for n in spec.present_names()]
        return run_numpy
    if engine.providers[0] in GPU_PROVIDERS:
        return _bound_runner(engine.session, engine.providers[0], names)
    return _value_runner(engine.session, names)


def _value_runner(session, names: list[str]) -> Runner:
    import onnxruntime as ort

    to_value = ort.OrtValue.ortvalue_from_numpy

    def run_values(feeds):
        values = {k: v if isinstance(v, ort.OrtValue) else to_value(np.ascontiguousarray(v))
                  for k, v in feeds.items()}
        try:
            out = session.run_with_ort_values(names, values)
        except Exception as exc:
            interrupts.reraise()  # a termination, not this call's failure
            raise InputError(f"onnxruntime failed to run the decoder: {first_line(exc)}") from exc
        return out[0].numpy(), list(out[1:])
    return run_values


def _bound_runner(session, provider: str, names: list[str]) -> Runner:
    """On a GPU, IO binding keeps the cache on the device: each step's presents are bound to
    CUDA memory and fed back as the next step's past without a round trip through the host;
    only the token ids and mask go up and the logits come down."""
    device_id = int(session.get_provider_options().get(provider, {}).get("device_id", 0))

    def run_bound(feeds):
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(names[0], "cpu")
        for name in names[1:]:
            binding.bind_output(name, "cuda", device_id)
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:
            interrupts.reraise()  # a termination, not this call's failure
            raise InputError(f"onnxruntime failed to run the decoder: {first_line(exc)}") from exc
        out = binding.get_outputs()
        return out[0].numpy(), list(out[1:])
    return run_bound
