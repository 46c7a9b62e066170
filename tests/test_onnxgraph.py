"""Reading an ONNX graph without its weights (onnxgraph.skeleton) and one weight alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

from edgepipe import onnxfile
from edgepipe.onnxgraph import initializer, skeleton


def _model(path, external: bool = False):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 256)).astype(np.float32)  # 64 KB: left out of the skeleton
    shape = np.array([-1, 16, 16], dtype=np.int64)  # a shape constant: kept
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
         helper.make_node("Reshape", ["y", "shape"], ["z"], name="reshape")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(shape, "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"note": "kept"})
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=onnxfile.sidecar(path).name, size_threshold=1024)
    else:
        onnx.save(model, str(path))
    return weight, shape


@pytest.mark.parametrize("external", [False, True])
def test_the_skeleton_has_the_graph_and_shapes_but_not_the_large_weights(tmp_path, external):
    path = tmp_path / "m.onnx"
    weight, shape = _model(path, external)
    full, skel = onnx.load(str(path), load_external_data=False), skeleton(path)
    assert [n.SerializeToString() for n in skel.graph.node] == [n.SerializeToString() for n in full.graph.node]
    assert skel.metadata_props[0].value == "kept" and skel.opset_import == full.opset_import
    tensors = {t.name: t for t in skel.graph.initializer}
    assert list(tensors["W"].dims) == [64, 256] and tensors["W"].data_type == TensorProto.FLOAT
    if not external:
        assert not tensors["W"].raw_data and skel.ByteSize() < full.ByteSize() / 10
    np.testing.assert_array_equal(numpy_helper.to_array(tensors["shape"]), shape)  # small: kept
    # Shape inference still works from it: it needs the shape constant, not the weight.
    skel.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    inferred = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in shape_inference.infer_shapes(skel).graph.value_info}
    assert inferred["y"] == [2, 256]
    np.testing.assert_array_equal(initializer(path, "W"), weight)
    with pytest.raises(KeyError, match="no initializer named 'nope'"):
        initializer(path, "nope")


def test_a_file_that_is_not_protobuf_fails_to_parse(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x07\x07\x07\x07")
    with pytest.raises(ValueError, match="wire type 7"):
        skeleton(tmp_path / "junk.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        skeleton(tmp_path / "empty.onnx")


def test_value_info_is_stripped_by_a_streamed_copy_that_keeps_everything_else(tmp_path):
    from edgepipe.onnxgraph import without_value_info

    path = tmp_path / "m.onnx"
    _model(path)
    model = onnx.load(str(path))
    model.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]))  # stale
    onnx.save(model, str(path))
    out = without_value_info(path, tmp_path / "stripped.onnx")
    stripped = onnx.load(str(out))
    assert len(stripped.graph.value_info) == 0
    del model.graph.value_info[:]
    assert stripped.SerializeToString() == model.SerializeToString()


def test_outputs_appended_to_a_copy_are_graph_outputs_onnx_and_onnxruntime_both_read(tmp_path):
    """with_outputs appends a second `graph` field holding only the new outputs; protobuf merges
    it into the first, so the copy is the model with those outputs, nothing else changed."""
    import onnxruntime as ort

    from edgepipe.onnxgraph import with_outputs

    path = tmp_path / "m.onnx"
    weight, _ = _model(path)
    model = onnx.load(str(path))
    model.ir_version = 9  # what this onnxruntime reads
    onnx.save(model, str(path))
    out = with_outputs(path, ["y"], tmp_path / "tapped.onnx")
    tapped, model = onnx.load(str(out)), onnx.load(str(path))
    assert [o.name for o in tapped.graph.output] == ["z", "y"]
    del tapped.graph.output[1:]
    assert tapped.SerializeToString() == model.SerializeToString()  # the rest, as it was
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    z, y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weight, rtol=1e-4, atol=1e-4)
    assert z.shape == (2, 16, 16)


def test_onnxruntime_tools_are_imported_without_torch():
    """onnxruntime.tools' __init__ imports torch when it is installed (1.1 s and about 200 MB of a
    quantize process, for a helper edgepipe never calls); the stand-in keeps it out and the
    helper itself still resolves. In a fresh process: this one may have torch already."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torch") is None:
        pytest.skip("without torch onnxruntime.tools never imports it")
    code = ("import sys\n"
            "from edgepipe.onnxgraph import ort_tools_without_torch\n"
            "ort_tools_without_torch()\n"
            "from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference\n"
            "from onnxruntime.quantization.shape_inference import quant_pre_process\n"
            "print('torch' in sys.modules)\n"
            "import onnxruntime.tools as tools\n"
            "print(callable(tools.infer_input_info))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"], out
    plain = subprocess.run([sys.executable, "-c", "import sys\nimport onnxruntime.tools\nprint('torch' in "
            "sys.modules)"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert plain == ["True"], plain  # what the stand-in is for: without it, torch comes in
