"""Fine-tuning a causal language model folder on plain text: it learns the text (held-out
next-token accuracy and perplexity), keeps its tokenizer, exports as a decoder, and refuses what
it cannot read."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

TEXT = "the film was very good and the music was great. a movie is not really bad but the plot is poor. "


def tiny_lm(folder):
    import torch

    from edgepipe.models.lm import save_byte_tokenizer

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64)).save_pretrained(folder)
    save_byte_tokenizer(folder)
    return folder


@pytest.mark.slow
def test_a_language_model_learns_the_text_and_exports(tmp_path, cli):
    folder = tiny_lm(tmp_path / "lm")
    (tmp_path / "text.txt").write_text(TEXT * 60)
    result = cli("train", folder, "--data", tmp_path / "text.txt", "-o", tmp_path / "tuned", "--epochs", "4",
                 "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "tuned" / "edgepipe_train.json").read_text())
    before, after = record["eval_accuracy_before"], record["eval_accuracy"]
    assert record["task"] == "text-generation" and after["low"] > before["high"] + 0.2  # two fixed sentences
    assert record["perplexity"]["after"] < record["perplexity"]["before"] / 2
    assert (tmp_path / "tuned" / "tokenizer.json").is_file() and "perplexity" in result.output
    assert cli("export", tmp_path / "tuned", "-o", tmp_path / "lm.onnx").exit_code == 0


def test_a_language_model_refuses_text_it_cannot_read_and_leaves_no_folder(tmp_path, cli):
    folder = tiny_lm(tmp_path / "lm")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "rows.csv").write_text("text,label\na,b\n")
    for args, message in ((("--data", tmp_path / "short.txt"), "too few"),
                          (("--data", tmp_path / "rows.csv"), "plain .txt file"),
                          (("--data", tmp_path / "short.txt", "--qat"), "without --eval-data"),
                          ((), "takes --data text.txt")):
        result = cli("train", folder, *args, "-o", tmp_path / "out" / "tuned")
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out").exists()
