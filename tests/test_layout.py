"""The package's shape: no import circle inside edgepipe (imports inside functions count too),
no import from a lower layer to a higher one, no oversized module, and the pipeline's
post-stage artifact check. No model is trained."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgepipe.artifacts import StageResult
from edgepipe.errors import InternalError
from edgepipe.pipeline.checks import check_artifacts
from edgepipe.reports import Report

PACKAGE = Path(__file__).resolve().parent.parent / "edgepipe"
MAX_MODULE_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> edgepipe modules it imports anywhere in its body (module level, in functions,
    and under `if TYPE_CHECKING:`: a type-only import is a dependency of the design too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_inside_edgepipe():
    graph = import_graph()
    assert "edgepipe.runtime.profiling" in graph["edgepipe.pipeline.profile_stage"]  # the graph sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_type_only_imports_count_as_dependencies(tmp_path, monkeypatch):
    (tmp_path / "edgepipe").mkdir()
    (tmp_path / "edgepipe" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                "    from edgepipe.b import B\n")
    (tmp_path / "edgepipe" / "b.py").write_text("from edgepipe.a import A\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "edgepipe")
    graph = import_graph()
    assert graph["edgepipe.a"] == {"edgepipe.b"} and find_cycle(graph) == ["edgepipe.a", "edgepipe.b", "edgepipe.a"]


def test_the_cycle_finder_finds_a_hidden_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The layers, lowest first: a module imports only from its own layer or those below. Errors and
# the termination flag depend on nothing; the runtime runs on the device alone; the leaf modules
# are shared tools; data turns user rows into inputs; models trains and loads models (Hugging
# Face folders too); quantize works on ONNX files (export's decoder route times an INT4 build
# through its public API); exporters make ONNX from models; prune cuts models and times them
# through an exporter; the pipeline, compare and serve put stages together; the CLI is the skin
# over all of it.
LAYERS = (
    ("errors", "interrupts", ""),  # "": the package's own __init__
    ("runtime",),
    ("metrics", "reports", "artifacts", "onnxfile", "onnxgraph", "instrument", "parity", "memory", "logs", "lazy"),
    ("data",),
    ("models",),
    ("quantize",),
    ("exporters",),
    ("prune",),
    ("pipeline", "compare", "serve"),
    ("cli", "__main__"),
)


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    (found,) = [i for i, names in enumerate(LAYERS) if part in names]
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    graph = import_graph()
    assert {m.split(".")[1] for m in graph if "." in m} <= {n for names in LAYERS for n in names}  # all placed
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer(d) > layer(m))
    assert not upward


def test_the_layer_check_sees_an_upward_import():
    assert layer("edgepipe.models.finetune") < layer("edgepipe.exporters.onnx_export") < layer("edgepipe.cli.app")
    assert layer("edgepipe.errors") < layer("edgepipe.runtime.engine") < layer("edgepipe.data.rows")
    assert layer("edgepipe") == layer("edgepipe.interrupts")


def test_no_module_is_oversized():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES}


def test_the_runtime_imports_nothing_outside_itself_but_errors_and_interrupts():
    # both are dependency-free leaves every layer uses: one family of user errors, and a
    # termination request that no layer's broad `except` may turn into one of them
    graph = import_graph()
    outside = {d for m, deps in graph.items() if m.startswith("edgepipe.runtime") for d in deps
               if not d.startswith("edgepipe.runtime") and d not in ("edgepipe.errors", "edgepipe.interrupts",
                                                                      "edgepipe")}
    assert not outside


def _tiny_onnx(path: Path, input_name: str = "x") -> Path:
    graph = helper.make_graph([helper.make_node("Relu", [input_name], ["y"])], "g",
                              [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_every_artifact_a_stage_claims_is_checked(tmp_path):
    good = _tiny_onnx(tmp_path / "m.onnx")
    check_artifacts(StageResult("export", {"onnx": good}, Report()), (["x"], ["y"]))
    with pytest.raises(InternalError, match=r"stage 'export' wrote onnx artifact .* has inputs \['x'\]"):
        check_artifacts(StageResult("export", {"onnx": good}, Report()), (["ids"], ["y"]))
    with pytest.raises(InternalError, match="is missing or empty"):
        check_artifacts(StageResult("quantize", {"onnx": tmp_path / "none.onnx"}, Report()))
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(InternalError, match="does not load in onnxruntime"):
        check_artifacts(StageResult("quantize", {"onnx": tmp_path / "bad.onnx"}, Report()))
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(InternalError, match="is not JSON"):
        check_artifacts(StageResult("profile", {"profile": tmp_path / "p.json"}, Report()))
    np.save(tmp_path / "c.npy", np.zeros(3))
    (tmp_path / "c.pt").write_bytes((tmp_path / "c.npy").read_bytes())
    with pytest.raises(InternalError, match="not a torch checkpoint"):
        check_artifacts(StageResult("train", {"checkpoint": tmp_path / "c.pt"}, Report()))


MAX_TEST_LINES = 500


def test_tests_mirror_the_package_and_no_test_file_grows_past_its_cap():
    tests = PACKAGE.parent / "tests"
    sizes = {p.relative_to(tests): len(p.read_text().splitlines()) for p in tests.rglob("test_*.py")}
    assert not {p: n for p, n in sizes.items() if n > MAX_TEST_LINES}
    # a stage package's tests sit in the folder of its name
    for folder in ("exporters", "quantize", "runtime", "serve", "pipeline"):
        assert (PACKAGE / folder).is_dir() and list((tests / folder).glob("test_*.py")), folder
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names))  # pytest imports them by basename (no __init__.py)


MAX_FUNCTION_LINES = 80


def test_no_function_is_oversized():
    """Counted from a function's first statement (its docstring included): a CLI command's Typer
    options are its signature, not its body."""
    import ast

    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{module_name(path)}.{node.name}"] = lines
    assert not long
