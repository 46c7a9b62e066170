"""A termination (SIGTERM) ends every "record a failure and go on" loop, even when a native
library turns the handler's exit into its own error: the export routes and the decoder search
here, the classifier quantize search in test_termination."""

from __future__ import annotations

import signal

import pytest

from edgepipe import interrupts


@pytest.fixture
def sigterm():
    """`native()` is a library call during which the CLI's SIGTERM handler runs and whose
    exit the library wraps in its own RuntimeError, as onnxruntime can. The handler is called
    directly: a real signal sent to a test process that runs native thread pools once crashed
    the interpreter on CI, which is not what these tests are about."""
    from edgepipe.cli import _terminate

    def native(*args, **kwargs):
        try:
            _terminate(signal.SIGTERM, None)
        except SystemExit as exc:
            raise RuntimeError(f"python callback failed: {exc!r}") from None
        raise AssertionError("the SIGTERM handler did not end the call")

    try:
        yield native
    finally:
        interrupts.clear()


def test_an_attempt_keeps_a_failure_and_goes_on_but_not_past_a_termination():
    with interrupts.attempt() as tried:
        raise ValueError("no kernel")
    assert isinstance(tried.error, ValueError)
    with interrupts.attempt() as tried:
        pass
    assert tried.error is None
    with pytest.raises(KeyboardInterrupt), interrupts.attempt():
        raise KeyboardInterrupt
    try:
        with pytest.raises(SystemExit) as ended, interrupts.attempt():
            try:
                interrupts.request(143)
            except SystemExit:
                raise RuntimeError("wrapped by a native library") from None
        assert ended.value.code == 143
    finally:
        interrupts.clear()


def test_a_sigterm_in_an_export_route_ends_the_export_instead_of_trying_the_next(tiny_llama, tmp_path,
                                                                                  monkeypatch, sigterm):
    from edgepipe.exporters import decoder, genai_route

    root, _ = tiny_llama
    tried_genai = []
    monkeypatch.setattr(decoder, "_export", sigterm)
    monkeypatch.setattr(genai_route, "genai_installed", lambda: True)
    monkeypatch.setattr(genai_route, "build_genai", lambda *a, **k: tried_genai.append(a))
    with pytest.raises(SystemExit) as ended:
        decoder.export_decoder(root / "folder", tmp_path / "d.onnx", route="auto")
    assert ended.value.code == 128 + signal.SIGTERM
    assert not tried_genai and not (tmp_path / "d.onnx").exists()


def test_a_sigterm_in_the_decoder_search_ends_it(tiny_decoder, tmp_path, monkeypatch, sigterm):
    from edgepipe.quantize import decoder

    built = []

    def build(recipe, *args):
        built.append(recipe.name)
        sigterm()

    monkeypatch.setattr(decoder, "build", build)
    config = decoder.DecoderQuantizeConfig(recipes=("int4-rtn-b32-acc4", "int8-dynamic"), text_windows=2, prompts=1)
    with pytest.raises(SystemExit) as ended:
        decoder.quantize_decoder(tiny_decoder.artifacts["onnx"], tmp_path / "q.onnx", config)
    assert ended.value.code == 128 + signal.SIGTERM
    assert built == ["int4-rtn-b32-acc4"] and not (tmp_path / "q.onnx").exists()
