"""Decoder architectures and routes: GPT-2 and Qwen2 folders, ONNX Runtime GenAI's builder graph
under edgepipe's cache names, the auto route's choice and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgepipe.runtime.generate import Generator  # noqa: E402


def test_gemm_and_tied_head_weights_become_constant_matmuls_for_int4():
    """GPT-2 exports its Conv1D layers as Gemm and its tied LM head as MatMul(x, Transpose(wte)):
    the INT4 quantizer sees only MatMuls with constant weights, so they are rewritten first,
    with the same outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgepipe.quantize.decoder_build import constant_matmuls

    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((16, 8)).astype(np.float32)  # used transposed (transB=1)
    wte = rng.standard_normal((32, 16)).astype(np.float32)  # a tied head reads it transposed
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc"),
         helper.make_node("Gemm", ["x", "w2"], ["g"], name="proj", transB=1),
         helper.make_node("Add", ["h", "g"], ["s"], name="sum"),
         helper.make_node("Transpose", ["wte"], ["wte_t"], name="tie", perm=[1, 0]),
         helper.make_node("MatMul", ["s", "wte_t"], ["logits"], name="head")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (wte, "wte"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert constant_matmuls(model) == 3
    inits = {i.name for i in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert "Gemm" not in ops and "Transpose" not in ops
    assert all(n.input[1] in inits for n in model.graph.node if n.op_type == "MatMul")
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two exports
@pytest.mark.parametrize("arch, weights", [("gpt2", 9), ("qwen2", 15)])
def test_gpt2_and_qwen2_folders_export_with_parity_and_quantize_every_weight(arch, weights, tmp_path):
    import onnx

    from edgepipe.exporters.decoder import export_decoder
    from edgepipe.quantize.decoder import DecoderQuantizeConfig, quantize_decoder

    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D layers (Gemm) and a head tied to the embedding
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300,
                                                                     n_positions=64))
    else:  # biased q/k/v projections, grouped-query attention
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "folder")
    # the traced graph: its Gemm layers and tied head (the builder's packs q/k/v and gate/up)
    exported = export_decoder(tmp_path / "folder", tmp_path / "decoder.onnx", route="dynamo")
    assert exported.record["parity"]["ok"] and all(c["same_tokens"] for c in exported.record["parity"]["cases"])
    config = DecoderQuantizeConfig(recipes=("int4-rtn-b32-acc4",), require_faster=False, min_agreement=0.0,
                                   text_windows=2, prompts=2)
    result = quantize_decoder(exported.artifacts["onnx"], tmp_path / "int4.onnx", config)
    nodes = [n.op_type for n in onnx.load(str(result.artifacts["onnx"])).graph.node]
    assert nodes.count("MatMulNBits") == weights and "Gemm" not in nodes
    assert abs(result.report.candidates[0]["nll_increase"]) < 0.05


def test_the_genai_builders_graph_takes_edgepipes_cache_names_and_generates_like_transformers(tiny_llama, tmp_path):
    """Route 2: ONNX Runtime GenAI's model builder (fused GroupQueryAttention). Its graph gets
    edgepipe's cache names and metadata, passes the same parity verdict, and generates what
    transformers generates; a GPT-2 folder, which the builder does not support, is one clear error."""
    pytest.importorskip("onnxruntime_genai")
    import onnx

    from edgepipe.errors import ExportError
    from edgepipe.exporters.decoder import export_decoder

    root, model = tiny_llama
    result = export_decoder(root / "folder", tmp_path / "genai.onnx", route="genai")
    assert result.record["exporter"] == "genai" and result.record["parity"]["ok"]
    graph = onnx.load(str(tmp_path / "genai.onnx"), load_external_data=False)
    generator = Generator(tmp_path / "genai.onnx")
    assert {i.name for i in graph.graph.input} == {"input_ids", "attention_mask", *generator.spec.past_names()}
    assert "GroupQueryAttention" in {n.op_type for n in graph.graph.node}  # the builder's own graph
    prompt = [3, 17, 42, 99, 7]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
    assert generator.generate(prompt, 12, stop_ids=())[:len(expected)] == expected and len(expected) >= 4

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                                n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ExportError, match="GenAI's builder could not build GPT2LMHeadModel"):
        export_decoder(tmp_path / "gpt2", tmp_path / "gpt2.onnx", route="genai")
    assert not (tmp_path / "gpt2.onnx").exists()


def test_auto_keeps_the_builders_graph_when_faster_in_fp32_or_int4_and_slower_in_neither():
    """On a 0.34B Llama both graphs ran FP32 at 50.6-51.5 ms per token, while INT4 ran 10.4 ms on
    the builder's fused graph and 13.3 ms traced: FP32 speed alone kept the slower INT4 graph."""
    from edgepipe.exporters.decoder import _choose

    def choose(dynamo: dict, genai: dict) -> str:
        attempts = [{"exporter": "dynamo", "ok": True, **dynamo}, {"exporter": "genai", "ok": True, **genai}]
        kept = _choose(attempts)
        assert "chosen_because" in kept
        return kept["exporter"]

    assert choose({"tpot_ms": 51.5, "int4_tpot_ms": 13.3}, {"tpot_ms": 50.6, "int4_tpot_ms": 10.4}) == "genai"
    assert choose({"tpot_ms": 51.5, "int4_tpot_ms": 10.4}, {"tpot_ms": 50.6, "int4_tpot_ms": 10.3}) == "dynamo"
    assert choose({"tpot_ms": 0.16, "int4_tpot_ms": 0.10}, {"tpot_ms": 0.066, "int4_tpot_ms": 0.11}) == "dynamo"
    assert choose({"tpot_ms": 0.16, "int4_error": "x"}, {"tpot_ms": 0.066, "int4_tpot_ms": 0.11}) == "genai"
    assert choose({"tpot_ms": 10.0}, {"tpot_ms": 9.9}) == "dynamo"  # within the noise: the traced graph
    assert _choose([{"exporter": "dynamo", "ok": False}, {"exporter": "genai", "ok": True, "tpot_ms": 1.0}])[
        "exporter"] == "genai"


def test_route_is_refused_for_what_is_not_a_causal_lm(tmp_path, cli):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    result = cli("export", str(tmp_path / "bert"), "-o", str(tmp_path / "b.onnx"), "--route", "genai")
    assert result.exit_code == 2 and "--route genai applies to causal LM folders" in result.output


@pytest.mark.slow  # two exports and their timing
def test_auto_route_times_both_and_refuses_a_genai_graph_that_does_not_match_torch(tiny_llama, tmp_path,
                                                                                    monkeypatch, cli):
    pytest.importorskip("onnxruntime_genai")
    import copy

    import onnx

    from edgepipe import onnxfile
    from edgepipe.exporters import decoder as decoder_mod
    from edgepipe.exporters import genai_route
    from edgepipe.exporters.decoder import export_decoder

    root, _ = tiny_llama
    result = export_decoder(root / "folder", tmp_path / "auto.onnx")  # auto: the default
    attempts = {a["exporter"]: a for a in result.record["attempts"]}
    assert set(attempts) == {"dynamo", "genai"} and all(a["ok"] and a["tpot_ms"] > 0 for a in attempts.values())
    assert all(a["int4_tpot_ms"] > 0 for a in attempts.values())  # each route's INT4 model timed too
    assert result.record["exporter"] == decoder_mod._choose(copy.deepcopy(result.record["attempts"]))["exporter"]
    assert "chosen_because" in attempts[result.record["exporter"]]
    assert not list(tmp_path.glob("*int4*")) and not list(tmp_path.glob(".*staging"))  # probes removed

    # a builder graph whose logits drift from torch's (as measured on a trained model) is not kept
    real = genai_route.build_genai

    def drifting(folder, out, spec, attach):
        seconds = real(folder, out, spec, attach)
        model = onnx.load(str(out))
        norm = next(t for t in model.graph.initializer if "final_norm" in t.name)
        values = onnx.numpy_helper.to_array(norm) * 1.5
        norm.CopyFrom(onnx.numpy_helper.from_array(values, norm.name))
        onnxfile.save(model, out)
        return seconds

    monkeypatch.setattr(genai_route, "build_genai", drifting)
    out = tmp_path / "drift.onnx"
    result = cli("export", str(root / "folder"), "-o", str(out), "--route", "auto", "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["exporter"] == "dynamo" and [a["ok"] for a in record["attempts"]] == [True, False]
    assert not record["attempts"][1]["parity"]["ok"] and "genai: does not match torch" in result.output


def test_a_large_builder_graph_is_placed_without_reading_its_weights(tmp_path, monkeypatch):
    """Above INLINE_BYTES the builder's data file becomes the model's sidecar by a move (the
    graph is edited alone); below it the model is one self-contained file."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgepipe.exporters import genai_route
    from edgepipe.runtime.modelfile import sidecar

    weight = numpy_helper.from_array(np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 100, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [weight])
    built = tmp_path / "built"
    built.mkdir()
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]),
              str(built / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    x = np.ones((1, 64), np.float32)
    expected = ort.InferenceSession(str(built / "model.onnx")).run(None, {"x": x})[0]

    def rename(model):
        model.graph.input[0].name = "z"
        model.graph.node[0].input[0] = "z"

    monkeypatch.setattr(genai_route, "INLINE_BYTES", 0)
    out = tmp_path / "placed.onnx"
    genai_route.place_graph(built / "model.onnx", out, rename)
    assert sidecar(out).is_file() and not (built / "model.onnx.data").exists()  # moved, not copied
    np.testing.assert_array_equal(ort.InferenceSession(str(out)).run(None, {"z": x})[0], expected)

    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]),
              str(built / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    monkeypatch.setattr(genai_route, "INLINE_BYTES", 1 << 30)
    small = tmp_path / "small.onnx"
    genai_route.place_graph(built / "model.onnx", small, rename)
    assert not sidecar(small).exists()
    np.testing.assert_array_equal(ort.InferenceSession(str(small)).run(None, {"z": x})[0], expected)


def test_the_genai_builders_error_is_whole_where_it_introduces_a_list():
    from edgepipe.exporters.genai_route import builder_error

    output = ("Valid precision + execution provider combinations are: ...\nTraceback (most recent call last):\n"
              "  File \"builder.py\", line 806\nValueError: FooForCausalLM is not supported; choose from one of:\n"
              "  LlamaForCausalLM\n  MistralForCausalLM\n")
    assert builder_error(output, 1) == ("ValueError: FooForCausalLM is not supported; choose from one of: "
                                        "LlamaForCausalLM, MistralForCausalLM")
    assert builder_error("", 3) == "exit 3"
    assert len(builder_error("Error: " + "x" * 400, 1)) == 300
