"""A pipeline whose source is a causal language model folder: train fine-tunes it on a .txt file,
export makes it a decoder with its KV cache, quantize runs the decoder search on the windows
fine-tuning held out, profile times it per output token, and Engine.from_run opens what was
deployed. A config that asks what a language model cannot do is refused before any work."""

from __future__ import annotations

import json
import textwrap

import pytest

from edgepipe.errors import ConfigError
from edgepipe.pipeline import config as config_mod
from edgepipe.pipeline import run_pipeline

SENTENCES = ("the assert statement checks a condition", "a list holds items in order", "the loop runs again",
             "a dict maps keys to values", "the function returns a value")


def _config(tmp_path, folder, stages='["train", "export", "quantize", "profile"]', dataset="text.txt") -> str:
    (tmp_path / "text.txt").write_text("\n".join(SENTENCES[i % 5] for i in range(600)) + "\n")
    path = tmp_path / "lm.toml"
    path.write_text(textwrap.dedent(f"""
        out_dir = "run"
        stages = {stages}
        [train]
        epochs = 1
        batch_size = 8
        max_length = 32
        lr = 3e-3
        [export]
        route = "dynamo"
        [quantize]
        recipes = ["int4-rtn-b32-acc4", "int8-dynamic"]
        require_faster = false
        [budgets]
        require_int8 = false
        [[models]]
        name = "lm"
        source = "{folder}"
        dataset = "{dataset}"
    """))
    return path


@pytest.mark.slow
def test_a_language_model_trains_exports_quantizes_and_profiles_in_a_pipeline(tiny_llama, tmp_path):
    from edgepipe.runtime import Engine

    root, _ = tiny_llama
    result = run_pipeline(config_mod.load(_config(tmp_path, root / "folder")))
    assert result.ok, result.table()
    model = result.manifest["models"]["lm"]
    stages = model["stages"]
    assert all(stages[s]["status"] == "ok" for s in ("train", "export", "quantize", "profile")), stages
    train = stages["train"]["record"]
    assert train["task"] == "text-generation"
    assert train["eval_accuracy"]["value"] > train["eval_accuracy_before"]["value"]
    quant = stages["quantize"]["record"]
    assert quant["kind"] == "decoder" and quant["chosen"] in ("int4-rtn-b32-acc4", "int8-dynamic")
    assert "given held-out tokens" in quant["judged_on"]  # fine-tuning's held-out windows, not the bundled text
    profile = stages["profile"]["record"]
    assert set(profile["latency"]) == {"fp32", "int8"} and profile["latency"]["fp32"][0]["ttft_ms"] > 0
    decided = model["deployment"]
    speedup = profile["speedup"]["int8"]["1"]
    assert decided["precision"] == ("int8" if speedup >= 1.0 else "fp32"), (decided, speedup)
    deployed = Engine.from_run(tmp_path / "run", "lm").run_info["artifact"]
    assert deployed == ("model.int8.onnx" if decided["precision"] == "int8" else "model.onnx")
    assert f"quantize ({quant['chosen']}" in result.table() and "nll" in result.table()
    again = run_pipeline(config_mod.load(tmp_path / "lm.toml"), resume=True)
    assert again.ok and json.loads((tmp_path / "run" / "manifest.json").read_text())["models"]["lm"]["stages"][
        "train"]["seconds"] == stages["train"]["seconds"]  # reused, not trained again


def test_a_language_model_is_not_pruned_and_trains_on_text(tiny_llama, tmp_path):
    root, _ = tiny_llama
    (tmp_path / "rows.csv").write_text("text,label\nhello,1\n")
    with pytest.raises(ConfigError, match="causal language model: its stages are train .* it is not pruned"):
        config_mod.load(_config(tmp_path, root / "folder", stages='["train", "prune", "export"]'))
    with pytest.raises(ConfigError, match="a .txt file"):
        config_mod.load(_config(tmp_path, root / "folder", dataset="rows.csv"))
