"""Export: every zoo model passes parity; user models; the failures export must catch."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepipe.errors import ConfigError, InputError, ParityError
from edgepipe.exporters import ExportConfig, export
from edgepipe.exporters.onnx_export import parity_cases
from edgepipe.exporters.source import load_factory
from edgepipe.runtime import Engine, InputSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "transformer"])
def test_zoo_model_passes_parity(zoo, name):
    record = zoo[name].export_record
    assert record["parity"]["ok"]
    assert record["parity"]["max_abs_diff"] <= 1e-4
    labels = [case["case"] for case in record["parity"]["cases"]]
    assert any("batch=1" in label for label in labels) and any("batch=7" in label for label in labels)
    if name in ("lstm", "transformer"):  # dynamic sequence length: checked at two lengths
        assert len({label.split("seq=")[1] for label in labels}) == 2
    assert record["exporter"] in ("dynamo", "torchscript")
    # the ONNX model really accepts other batch sizes (the batch-1 specialization trap)
    engine = Engine(zoo[name].onnx)
    x = zoo[name].dataset.x_test[:4]
    assert engine.run(x)["logits"].shape[0] == 4


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_exported_file_takes_onnxruntime_quantize_dynamic_as_is(zoo, name, tmp_path):
    """The dynamo exporter lists every weight in value_info too; onnxruntime's quantize_dynamic
    refused such a file ("Inferred shape and existing shape differ"), so export drops the copies."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(zoo[name].onnx)
    assert not {v.name for v in model.graph.value_info} & {t.name for t in model.graph.initializer}
    quantize_dynamic(str(zoo[name].onnx), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    x = zoo[name].dataset.x_test[:8]
    reference = Engine(zoo[name].onnx).run(x)["logits"]
    np.testing.assert_allclose(Engine(tmp_path / "q.onnx").run(x)["logits"], reference,
                               atol=0.1 * float(np.abs(reference).max()))


def test_parity_cases_cover_batch_one_and_larger_and_second_length():
    specs = [InputSpec("ids", "int64", ("batch", "seq"), example={"seq": 24})]
    cases = parity_cases(specs, (1, 7))
    assert {"batch": 1, "seq": 24} in cases and {"batch": 7, "seq": 24} in cases
    assert {"batch": 7, "seq": 13} in cases


def test_example_batch_one_is_rejected():
    with pytest.raises(ConfigError, match="example_batch must be >= 2"):
        ExportConfig(example_batch=1)


@pytest.mark.slow  # a dynamo export of a text model with its parity check
def test_user_model_with_two_inputs_of_different_dtypes(tmp_path):
    out = tmp_path / "text.onnx"
    result = export(f"{EXAMPLES / 'user_model.py'}:build", out)
    assert result.record["exporter"] == "dynamo" and result.record["parity"]["ok"]
    engine = Engine(out)
    assert [(s.name, s.dtype, s.shape) for s in engine.inputs] == [
        ("ids", "int64", ("batch", "seq")), ("mask", "bool", ("batch", "seq"))]
    ids = np.random.default_rng(0).integers(0, 1000, size=(5, 9))
    mask = np.ones((5, 9), bool)
    mask[:, 6:] = False
    torch_model, _, _ = load_factory(f"{EXAMPLES / 'user_model.py'}:build")[0]
    with torch.no_grad():
        expected = torch_model.eval()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(engine.run({"ids": ids, "mask": mask})["logits"], expected, atol=1e-4, rtol=1e-3)


def test_torchscript_shape_baking_is_caught_by_parity(tmp_path):
    """TorchScript tracing of nn.MultiheadAttention bakes the example's batch/seq into a Reshape
    (torch 2.13): the model loads and runs at the example size, and only parity at other sizes
    shows it is broken."""
    out = tmp_path / "text.onnx"
    with pytest.raises(ParityError) as err:
        export(f"{EXAMPLES / 'user_model.py'}:build", out, ExportConfig(exporters=("torchscript",)))
    assert "batch=7" in str(err.value) and "torchscript" in str(err.value)
    assert not out.exists()


BATCH_DEPENDENT = textwrap.dedent("""
    import torch
    class Model(torch.nn.Module):
        def forward(self, x):
            # Python-level branch on the batch size: tracing bakes in the example's branch.
            if x.shape[0] == 2:
                return x * 2.0
            return x * 3.0
    def build():
        return Model(), ["x:float32:batch,4"]
""")


def test_parity_fails_the_stage_and_leaves_no_artifact(tmp_path):
    source = tmp_path / "bad_model.py"
    source.write_text(BATCH_DEPENDENT)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError) as err:
        export(f"{source}:build", out, ExportConfig(exporters=("torchscript",)))
    text = str(err.value)
    assert "batch=1" in text and "max abs diff" in text and "'output'" in text
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("ref, message", [
    ("{dir}/missing.py:build", "model file not found"),
    ("{dir}/model.py:nope", "has no callable 'nope'; callables defined there: build"),
    ("{dir}/model.py:build_bad", "returned int, expected a torch.nn.Module"),
    ("{dir}/model.py:build_noinputs", "declares no inputs"),
])
def test_factory_errors(tmp_path, ref, message):
    (tmp_path / "model.py").write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Linear(4, 2), ["x:float32:batch,4"]
        build_bad = lambda: 3
        def build_noinputs():
            return torch.nn.Linear(4, 2)
    """))
    with pytest.raises(InputError) as err:
        export(ref.format(dir=tmp_path), tmp_path / "m.onnx")
    assert message in str(err.value)


def test_checkpoint_from_something_else(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(InputError, match="not an edgepipe checkpoint"):
        export(other, tmp_path / "m.onnx")


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "code-was-executed"
    payload = _Payload()
    payload.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"format": "edgepipe.checkpoint/1", "payload": payload}, evil)
    with pytest.raises(InputError, match="pickled Python objects"):
        export(evil, tmp_path / "m.onnx")
    assert not marker.exists()
