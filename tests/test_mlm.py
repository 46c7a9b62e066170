"""Masked-LM pre-training of a text classifier's encoder: the masks follow BERT's rule and the
seed; pre-training learns the text's structure, resumes exactly, and hands back a classifier
folder that fine-tunes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from byod import sentences, text_classifier, write_csv

transformers = pytest.importorskip("transformers")

PATTERNS = ("the film was very good and the music was great", "a movie is not really bad but the plot is poor",
            "the actor was quite fine and the scene was good")


def test_masks_spare_special_tokens_and_follow_the_80_10_10_rule():
    from edgepipe.models.mlm import mask

    class Tokenizer:
        mask_token_id = 4

        def __len__(self):
            return 30

    ids = np.random.default_rng(0).integers(5, 30, (400, 50))
    special = np.zeros_like(ids, dtype=bool)
    special[:, 0] = special[:, -1] = True
    masked, labels = mask(ids, special, Tokenizer(), 0.15, seed=3)
    chosen = labels >= 0
    assert not chosen[special].any() and abs(chosen.mean() - 0.15 * 48 / 50) < 0.01
    assert (labels[chosen] == ids[chosen]).all() and (masked[~chosen] == ids[~chosen]).all()
    assert abs((masked[chosen] == 4).mean() - 0.8) < 0.03  # the rest: 10% random, 10% kept
    assert abs((masked[chosen] == ids[chosen]).mean() - 0.1) < 0.03
    again, _ = mask(ids, special, Tokenizer(), 0.15, seed=3)
    assert (again == masked).all() and not (mask(ids, special, Tokenizer(), 0.15, seed=4)[0] == masked).all()


@pytest.mark.slow
def test_pretraining_learns_the_text_resumes_exactly_and_the_folder_fine_tunes(tmp_path, cli, monkeypatch):
    from edgepipe.models import mlm

    folder = text_classifier(tmp_path / "bert")
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(rng.choice(PATTERNS) for _ in range(600)))
    result = cli("train", folder, "--mlm", "--data", corpus, "-o", tmp_path / "pre", "--epochs", "3", "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "pre" / "edgepipe_train.json").read_text())
    before, after = record["eval_accuracy_before"], record["eval_accuracy"]
    assert record["task"] == "masked-lm pre-training" and after["low"] > before["high"]  # three fixed sentences
    config = transformers.AutoConfig.from_pretrained(tmp_path / "pre")
    assert config.architectures == ["BertForSequenceClassification"] and config.id2label[1] == "positive"
    rows = write_csv(tmp_path / "rows.csv", sentences(200))
    assert cli("train", tmp_path / "pre", "--data", rows, "-o", tmp_path / "tuned", "--epochs", "1").exit_code == 0
    # interrupted at step 7 and resumed, it ends as the run in one go: the masks follow the step
    config = mlm.PretrainConfig(epochs=2, lr=3e-3, checkpoint_steps=5)
    whole = mlm.pretrain_mlm(folder, corpus, tmp_path / "whole", config)
    step = mlm.MaskedLMTrainer.train_step

    def stopped_at_step_7(self, index):
        if self.step == 7:
            raise KeyboardInterrupt
        return step(self, index)

    monkeypatch.setattr(mlm.MaskedLMTrainer, "train_step", stopped_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        mlm.pretrain_mlm(folder, corpus, tmp_path / "cut", config)
    monkeypatch.setattr(mlm.MaskedLMTrainer, "train_step", step)
    resumed = mlm.pretrain_mlm(folder, corpus, tmp_path / "cut", mlm.PretrainConfig(
        epochs=2, lr=3e-3, checkpoint_steps=5), resume=True)
    assert resumed.report.resumed_from_step == 7 and resumed.report.epochs == whole.report.epochs


def test_pretraining_refuses_what_it_cannot_read_and_leaves_no_folder(tmp_path, cli):
    folder = text_classifier(tmp_path / "bert")
    rows = write_csv(tmp_path / "rows.csv", sentences(20))
    (tmp_path / "short.txt").write_text("one line\n")
    for args, message in ((("--data", rows), "plain .txt file"), (("--data", tmp_path / "short.txt"), "too few"),
                          (("--data", rows, "--qat"), "without --teacher")):
        result = cli("train", folder, "--mlm", *args, "-o", tmp_path / "out" / "pre")
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out").exists()
