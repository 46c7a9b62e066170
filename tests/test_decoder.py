"""Decoder language models: a tiny Llama folder (random weights, built offline) exported with its
KV cache, proven against torch on prefill and decode, and generated from in the torch-free runtime."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgepipe.errors import InputError  # noqa: E402
from edgepipe.runtime.generate import Generator, Sampling  # noqa: E402

pytestmark = pytest.mark.slow  # an export (about 15 s)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      eos_token_id=255)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "folder")
    return root, model


@pytest.fixture(scope="module")
def exported(tiny_llama):
    from edgepipe.exporters.decoder import export_decoder

    root, _ = tiny_llama
    return export_decoder(root / "folder", root / "decoder.onnx")


def test_the_decoder_matches_torch_on_prefill_and_sixteen_cached_steps(exported):
    parity = exported.record["parity"]
    assert parity["ok"] and [c["prompt"] for c in parity["cases"]] == [5, 11]
    assert all(c["steps"] == 16 and c["same_tokens"] and c["max_abs_diff"] < 1e-3 for c in parity["cases"])
    names = [i["name"] for i in exported.record["inputs"]]
    assert names == ["input_ids", "attention_mask", "past.0.key", "past.0.value", "past.1.key", "past.1.value"]


def test_greedy_generation_in_the_runtime_equals_transformers_generate(tiny_llama, exported):
    _, model = tiny_llama
    prompt = [3, 17, 42, 99, 7]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
    generator = Generator(exported.artifacts["onnx"])
    seen: list[int] = []
    tokens = generator.generate(prompt, max_new_tokens=12, stop_ids=(), on_token=seen.append)
    # transformers stops at the config's EOS (255); the runtime was told not to stop
    assert tokens[:len(expected)] == expected and len(expected) >= 4 and len(tokens) == 12 and seen == tokens
    assert len(expected) == 12 or expected[-1] == 255


def test_sampling_is_seeded_and_top_k_one_is_greedy(exported):
    generator = Generator(exported.artifacts["onnx"])
    prompt = [1, 2, 3]
    greedy = generator.generate(prompt, 8, stop_ids=())
    one = generator.generate(prompt, 8, sampling=Sampling(temperature=1.0, top_k=1, seed=3), stop_ids=())
    assert one == greedy
    first = generator.generate(prompt, 8, sampling=Sampling(temperature=1.5, top_p=0.9, seed=5), stop_ids=())
    again = generator.generate(prompt, 8, sampling=Sampling(temperature=1.5, top_p=0.9, seed=5), stop_ids=())
    assert first == again
    stop = greedy[2]
    assert generator.generate(prompt, 8, stop_ids=(stop,)) == greedy[:greedy.index(stop) + 1]


def test_bad_prompts_and_folders_are_one_clear_error(tiny_llama, exported, tmp_path, cli):
    generator = Generator(exported.artifacts["onnx"])
    with pytest.raises(InputError, match="exceeds the model's context of 64"):
        generator.generate(list(range(60)), 8)
    with pytest.raises(InputError, match="outside the vocabulary"):
        generator.generate([1, 999], 4)
    result = cli("generate", str(exported.artifacts["onnx"]), "--prompt-ids", ",".join(["1"] * 70))
    assert result.exit_code == 2 and "context of 64" in result.output
    result = cli("generate", str(exported.artifacts["onnx"]), "--prompt-ids", "1,2,3", "--max-new-tokens", "4")
    assert result.exit_code == 0 and len(result.output.split()) == 4
    # generated inputs are a consistent prefill (16 tokens, empty cache): profile runs it
    result = cli("profile", str(exported.artifacts["onnx"]), "--batch", "1,2", "--seconds", "0.05")
    assert result.exit_code == 0, result.output
    result = cli("quantize", str(exported.artifacts["onnx"]), "-o", str(tmp_path / "q.onnx"))
    assert result.exit_code == 2 and "is a decoder with a KV cache" in result.output
    bert = tmp_path / "bert"
    transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    result = cli("export", str(bert), "-o", str(tmp_path / "x.onnx"), "--task", "text-generation")
    assert result.exit_code == 2 and "not a causal language model" in result.output
    root, _ = tiny_llama
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((root / "folder" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    result = cli("export", str(broken), "-o", str(tmp_path / "y.onnx"))
    assert result.exit_code == 2 and "cannot load it as a causal LM" in result.output
    assert json.loads((root / "folder" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_the_readme_language_model_block_runs_as_written(tmp_path):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S) if "edgepipe generate" in b]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert len(result.stdout.strip().splitlines()[-1].split()) == 8  # the eight token ids
    assert "same tokens: True" in result.stdout
