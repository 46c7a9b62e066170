"""Models past protobuf's 2 GB limit: written as the graph file plus `<name>.data`, and kept
consistent through export, quantize builds, copies, hashing, profiling and Triton. The threshold
is lowered here so a small model takes the same path (a real 2 GB model is benchmark work)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch

from edgepipe import onnxfile
from edgepipe.artifacts import sha256
from edgepipe.exporters import ExportConfig, export
from edgepipe.quantize import builders, rewrites
from edgepipe.quantize.recipes import Recipe
from edgepipe.runtime import Engine
from edgepipe.runtime.modelfile import model_bytes, sidecar


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(onnxfile, "EXTERNAL_BYTES", 10_000)


def _locations(path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def _mlp_onnx(tmp_path, exporter: str = "dynamo"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return export(model, tmp_path / "model.onnx", ExportConfig(exporters=(exporter,)), inputs=["x:float32:batch,64"])


def test_export_writes_one_external_data_file_named_after_the_model(tmp_path, small_threshold):
    result = _mlp_onnx(tmp_path)
    path = result.artifacts["onnx"]
    assert sidecar(path).is_file() and _locations(path) == {"model.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # no staging left
    assert result.record["size_bytes"] == model_bytes(path) > path.stat().st_size
    umask = os.umask(0)
    os.umask(umask)
    assert sidecar(path).stat().st_mode & 0o777 == 0o666 & ~umask  # shared like the model file
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    assert Engine(path).run(x).popitem()[1].shape == (3, 10)
    before = sha256(path)
    with open(sidecar(path), "r+b") as f:  # the weights are part of the artifact's identity
        f.seek(100)
        f.write(b"\x01\x02\x03\x04")
    assert sha256(path) != before


def test_torchscript_refuses_a_model_past_the_limit(tmp_path, small_threshold):
    from edgepipe.errors import ExportError

    with pytest.raises(ExportError, match="one file per tensor"):
        _mlp_onnx(tmp_path, exporter="torchscript")
    assert not list(tmp_path.iterdir())  # a failed export leaves nothing behind


def test_quantize_builds_and_copies_keep_the_weights_beside_their_model(tmp_path, small_threshold):
    source = _mlp_onnx(tmp_path).artifacts["onnx"]
    work = tmp_path / "work"
    work.mkdir()
    pre, attempts = rewrites.preprocess(source, work)
    assert attempts[-1]["ok"] and (pre == source or sidecar(pre).is_file())
    stripped = rewrites.strip_value_info(source, work / "stripped.onnx")
    assert _locations(stripped) == {"stripped.onnx.data"}
    built = work / "cand0.onnx"
    builders.build(Recipe("dynamic", weight_type="S8"), stripped, built, None, 0)
    assert sidecar(built).is_file() and _locations(built) == {"cand0.onnx.data"}
    shipped = onnxfile.copy(built, tmp_path / "model.int8.onnx")
    assert _locations(shipped) == {"model.int8.onnx.data"} and sidecar(shipped).is_file()
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    expected = Engine(built).run(x).popitem()[1]
    for name in ("cand0.onnx", "cand0.onnx.data"):
        (work / name).unlink()  # the copy must not lean on the work folder's files
    np.testing.assert_array_equal(Engine(shipped).run(x).popitem()[1], expected)
    # a small model copied over it takes its sidecar away
    tiny = tmp_path / "tiny.onnx"
    onnx.save(onnx.load(str(shipped)), str(tiny))
    onnxfile.copy(tiny, shipped)
    assert not sidecar(shipped).exists() and Engine(shipped).run(x).popitem()[1].shape == (4, 10)


def test_triton_repository_carries_the_external_data(tmp_path, small_threshold):
    from edgepipe.serve.triton import TritonConfig, export_triton

    source = _mlp_onnx(tmp_path).artifacts["onnx"]
    result = export_triton(source, tmp_path / "repo", TritonConfig(name="mlp"), validate=False)
    target = result.artifacts["onnx"]
    assert sidecar(target).is_file() and _locations(target) == {"model.onnx.data"}
    assert target.parent != source.parent and Engine(target).inputs[0].name == "x"


def test_a_failed_staged_write_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "m.onnx"
    with pytest.raises(RuntimeError):
        with onnxfile.staged_model(target) as staged:
            staged.write_bytes(b"partial")
            raise RuntimeError("exporter crashed")
    assert not target.exists() and not list(target.parent.iterdir())


def test_the_lean_preprocess_of_a_large_model_keeps_its_weights_beside_it_and_its_outputs(
        tmp_path, small_threshold, monkeypatch):
    monkeypatch.setattr(rewrites, "LEAN_PREPROCESS_BYTES", 0)  # every model counts as large
    source = _mlp_onnx(tmp_path).artifacts["onnx"]
    work = tmp_path / "work"
    work.mkdir()
    pre, attempts = rewrites.preprocess(source, work)
    assert attempts == [{"step": "lean", "ok": True}] and pre.name == "pre_lean.onnx"
    assert _locations(pre) == {"pre_lean.onnx.data"} and sidecar(pre).is_file()
    assert not onnx.load(str(pre), load_external_data=False).graph.value_info
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(Engine(pre).run(x).popitem()[1], Engine(source).run(x).popitem()[1],
                               rtol=1e-5, atol=1e-6)
