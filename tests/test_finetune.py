"""Fine-tuning a Hugging Face classifier folder on the user's rows: a CSV of text and an image
folder, then export and quantize with the same data; an interrupted run resumes exactly where it
stopped; a loss that is not finite stops with one line and keeps the checkpoint; bad arguments
leave no output folder. Tiny random-weight models, a few hundred rows."""

from __future__ import annotations

import json
import re

import pytest
import torch
from byod import digit_folder, image_classifier, sentences, text_classifier, write_csv

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # every test here trains


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return text_classifier(root / "bert"), write_csv(root / "train.csv", sentences(300))


def test_a_text_folder_fine_tuned_on_a_csv_learns_exports_and_quantizes_with_the_same_rows(reviews, tmp_path, cli):
    folder, rows = reviews
    result = cli("train", folder, "--data", rows, "-o", tmp_path / "tuned", "--epochs", "3", "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "tuned" / "edgepipe_train.json").read_text())
    before, after = record["eval_accuracy_before"], record["eval_accuracy"]
    # the label is the one good/bad word in each row: learnable, and random weights are near chance
    assert after["low"] > 0.8 and after["value"] > before["value"] + 0.2, record["epochs"]
    assert len(record["epochs"]) == 3 and record["epochs"][record["best_epoch"] - 1]["eval_accuracy"] == after
    assert sum(record["rows"].values()) == 300 and record["rows"]["eval"] >= 30  # a seeded 80/20 split
    made = {p.name for p in (tmp_path / "tuned").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "edgepipe_train.json"} <= made
    assert ".edgepipe-train" not in made  # the checkpoint goes once the folder is whole
    assert "held-out accuracy" in result.output and "epoch" in result.output
    result = cli("export", tmp_path / "tuned", "-o", tmp_path / "tuned.onnx")
    assert result.exit_code == 0, result.output
    result = cli("quantize", tmp_path / "tuned.onnx", "-o", tmp_path / "q.onnx", "--data", rows, "--batch", "32",
                 "--json", tmp_path / "q.json", "--time-budget", "10")
    assert result.exit_code in (0, 1), result.output  # 1: no INT8 candidate faster on this CPU
    quantized = json.loads((tmp_path / "q.json").read_text())
    assert quantized["fp32"]["accuracy"] >= 0.8  # the exported fine-tuned model, judged on the same CSV


def test_an_image_folder_fine_tunes_an_image_classifier(tmp_path, cli):
    folder = image_classifier(tmp_path / "resnet")
    images = digit_folder(tmp_path / "digits", per_class=20)
    result = cli("train", folder, "--data", images, "-o", tmp_path / "tuned", "--epochs", "4", "--lr", "3e-3",
                 "--batch-size", "16")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "tuned" / "edgepipe_train.json").read_text())
    assert record["task"] == "image-classification"
    assert record["eval_accuracy"]["value"] > record["eval_accuracy_before"]["value"] + 0.2, record["epochs"]
    assert (tmp_path / "tuned" / "preprocessor_config.json").is_file()
    assert cli("export", tmp_path / "tuned", "-o", tmp_path / "tuned.onnx").exit_code == 0


def test_an_interrupted_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(reviews, tmp_path,
                                                                                     monkeypatch):
    from edgepipe.models import finetune as ft

    folder, rows = reviews
    config = ft.FinetuneConfig(epochs=2, lr=3e-3, checkpoint_steps=5)
    whole = ft.finetune(folder, rows, tmp_path / "whole", config)
    step = ft.Trainer.train_step

    def stopped_at_step_7(self, index):
        if self.step == 7:
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM through the CLI's handler
        return step(self, index)

    monkeypatch.setattr(ft.Trainer, "train_step", stopped_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(folder, rows, tmp_path / "cut", config)
    state = torch.load(tmp_path / "cut" / ft.STATE_DIR / "state.pt", weights_only=True)
    assert state["step"] == 7 and not (tmp_path / "cut" / "config.json").exists()
    with pytest.raises(ft.InputError, match="is not empty: give a new folder, or --resume"):
        ft.finetune(folder, rows, tmp_path / "cut", config)
    monkeypatch.setattr(ft.Trainer, "train_step", step)
    resumed = ft.finetune(folder, rows, tmp_path / "cut", config, resume=True)
    assert resumed.report.resumed_from_step == 7 and resumed.report.steps == whole.report.steps
    assert resumed.report.epochs == whole.report.epochs  # the same losses and accuracies, epoch by epoch
    a = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "whole").state_dict()
    b = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_loss_that_is_not_finite_stops_with_one_line_and_keeps_the_last_checkpoint(reviews, tmp_path, cli,
                                                                                     monkeypatch):
    folder, rows = reviews
    calls = {"n": 0}
    cross_entropy = torch.nn.functional.cross_entropy

    def diverging(*args, **kwargs):  # finite for 25 training steps, then NaN
        calls["n"] += 1
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 25 and torch.is_grad_enabled() else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", diverging)
    result = cli("train", folder, "--data", rows, "-o", tmp_path / "tuned", "--epochs", "3", "--lr", "3e-3")
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    kept = re.match(r"error: the training loss became nan at step 26: the checkpoint of step (\d+) is kept; lower "
                    r"--lr", line)
    assert kept, line
    assert "Traceback" not in result.output
    state = torch.load(tmp_path / "tuned" / ".edgepipe-train" / "state.pt", weights_only=True)
    # the end of the first epoch (about 15 steps), the last checkpoint before the loss went bad
    assert state["step"] == int(kept.group(1)) < 26 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("args, message", [
    ((), "needs labelled rows: --data"),
    (("--data", "missing.csv"), "missing.csv"),
    (("--data", "{rows}", "--label-column", "stars"), "stars"),
    (("--data", "{rows}", "--resume"), "holds no interrupted training to resume"),
    (("--data", "{rows}", "--epochs", "0"), "epochs"),
    (("--data", "{rows}", "--model", "mlp"), "not both"),
])
def test_bad_arguments_are_one_line_and_leave_no_output_folder(reviews, tmp_path, cli, args, message):
    folder, rows = reviews
    args = [str(rows) if a == "{rows}" else a for a in args]
    result = cli("train", folder, *args, "-o", tmp_path / "out" / "tuned")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_language_model_folder_with_labelled_rows_is_refused(tmp_path, cli):
    from edgepipe.models.lm import save_byte_tokenizer

    lm = tmp_path / "lm"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2)).save_pretrained(lm)
    save_byte_tokenizer(lm)
    rows = write_csv(tmp_path / "rows.csv", sentences(20))
    result = cli("train", lm, "--data", rows, "-o", tmp_path / "tuned")
    assert result.exit_code == 2 and "a language model reads a plain .txt file" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm", "rows.csv"]


def test_a_student_cut_from_the_teacher_learns_from_its_logits(reviews, tmp_path, cli):
    folder, rows = reviews
    assert cli("train", folder, "--data", rows, "-o", tmp_path / "teacher", "--epochs", "3",
               "--lr", "3e-3").exit_code == 0
    result = cli("train", "--teacher", tmp_path / "teacher", "--keep-every", "2", "--data", rows,
                 "-o", tmp_path / "student", "--epochs", "3", "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "student" / "edgepipe_train.json").read_text())
    teacher = record["teacher"]
    assert record["params"] < teacher["params"] and "the student has" in result.output
    # on the same held-out rows, the student ends where the teacher is (within one row's worth)
    assert record["eval_accuracy"]["value"] >= teacher["eval_accuracy"]["value"] - 1 / record["rows"]["eval"] - 1e-9
    assert transformers.AutoConfig.from_pretrained(tmp_path / "student").num_hidden_layers == 1
    assert cli("export", tmp_path / "student", "-o", tmp_path / "student.onnx").exit_code == 0
    result = cli("train", "--teacher", tmp_path / "teacher", "--data", rows, "-o", tmp_path / "neither")
    assert result.exit_code == 2 and "one of the two" in result.output


def test_quantization_aware_training_keeps_plain_weights_and_resumes_with_its_ranges(reviews, tmp_path, cli,
                                                                                     monkeypatch):
    from edgepipe.models import finetune as ft

    folder, rows = reviews
    assert cli("train", folder, "--data", rows, "-o", tmp_path / "tuned", "--epochs", "3",
               "--lr", "3e-3").exit_code == 0
    result = cli("train", tmp_path / "tuned", "--data", rows, "-o", tmp_path / "qat", "--qat", "--epochs", "1",
                 "--lr", "1e-4")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "qat" / "edgepipe_train.json").read_text())
    assert record["qat"]["activations"] == "symmetric" and "simulated INT8" in result.output
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "qat")
    assert record["qat"]["layers"] == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert not any("parametrizations" in k or "fake_quant" in k for k in model.state_dict())
    assert cli("export", tmp_path / "qat", "-o", tmp_path / "qat.onnx").exit_code == 0
    # interrupted and resumed, QAT ends as it does in one go: its quantizers' ranges are in the checkpoint
    config = ft.FinetuneConfig(epochs=2, lr=1e-4, checkpoint_steps=5, qat=True)
    whole = ft.finetune(tmp_path / "tuned", rows, tmp_path / "whole", config)
    step = ft.Trainer.train_step

    def stopped_at_step_7(self, index):
        if self.step == 7:
            raise KeyboardInterrupt
        return step(self, index)

    monkeypatch.setattr(ft.Trainer, "train_step", stopped_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(tmp_path / "tuned", rows, tmp_path / "cut", config)
    monkeypatch.setattr(ft.Trainer, "train_step", step)
    resumed = ft.finetune(tmp_path / "tuned", rows, tmp_path / "cut", config, resume=True)
    assert resumed.report.epochs == whole.report.epochs
    result = cli("train", folder, "--data", rows, "-o", tmp_path / "bad", "--qat-activations", "asymmetric")
    assert result.exit_code == 2 and "add --qat" in result.output and not (tmp_path / "bad").exists()
