"""Token classification: rows of words with a tag per word (JSONL lists, space-separated CSV, a
CoNLL file) become the model's tokens with each word's tag on its first token; fine-tuning,
export, quantize and the runtime's WordTagger judge and tag words, not tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from byod import TAGS, tagged_sentences, token_classifier, write_conll, write_csv, write_jsonl

from edgepipe.errors import InputError
from edgepipe.metrics import IGNORED, clustered_proportion, scores
from edgepipe.quantize.evaluation import flips

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return token_classifier(root / "bert"), tagged_sentences(300), root


def _pre(folder):
    from edgepipe.models.finetune import load_classifier

    return load_classifier(folder)[3]


def _load(path, pre, **options):
    from edgepipe.data.labelled import load_labelled

    return load_labelled(path, pre, test_fraction=1.0, max_test=1000, **options)


def test_each_words_tag_sits_on_its_first_token_in_every_format(tagger, tmp_path):
    folder, rows, _ = tagger
    pre = _pre(folder)
    assert pre.per_word and pre.labels == TAGS
    rows = rows[:40]
    loaded = [_load(write_jsonl(tmp_path / "t.jsonl", rows), pre),
              _load(write_conll(tmp_path / "t.conll", rows), pre),
              _load(write_csv(tmp_path / "t.csv", [{"words": " ".join(r["tokens"]), "ner_tags": " ".join(r["tags"])}
                                                   for r in rows]), pre)]
    first = loaded[0]
    for other in loaded[1:]:
        assert np.array_equal(other.labels, first.labels)
        assert np.array_equal(other.test["input_ids"], first.test["input_ids"])
    ids, labels = first.test["input_ids"], first.labels
    assert labels.shape == ids.shape
    for row, source in enumerate(rows):
        tagged = labels[row][labels[row] != IGNORED]
        assert [TAGS[t] for t in tagged] == source["tags"]  # one tag per word, in order
        assert labels[row][0] == IGNORED  # [CLS]
        assert np.all(labels[row][ids[row] == 0] == IGNORED)  # padding
    hyphenated = next(i for i, r in enumerate(rows) if any("-" in w for w in r["tokens"]))
    words, tokens = len(rows[hyphenated]["tokens"]), int((ids[hyphenated] != 0).sum()) - 2
    assert tokens > words and (labels[hyphenated] != IGNORED).sum() == words  # the later tokens are not judged


def test_a_row_whose_tags_do_not_match_its_words_or_the_models_tags_is_refused_by_row(tagger, tmp_path):
    folder, rows, _ = tagger
    pre = _pre(folder)
    short = [dict(rows[0]), {"tokens": ["good", "film"], "tags": ["B-POS"]}]
    with pytest.raises(InputError, match=r"row 2: 2 words but 1 tags"):
        _load(write_jsonl(tmp_path / "short.jsonl", short), pre)
    with pytest.raises(InputError, match=r"row 1: label 'B-PER' is not one of the model's labels \(O, B-POS"):
        _load(write_jsonl(tmp_path / "unknown.jsonl", [{"tokens": ["x"], "tags": ["B-PER"]}]), pre)
    (tmp_path / "bad.conll").write_text("good\n")
    with pytest.raises(InputError, match="line 1: a word without its tag"):
        _load(tmp_path / "bad.conll", pre)


def test_words_are_judged_not_tokens_and_the_interval_is_over_rows():
    labels = np.array([[IGNORED, 1, IGNORED, 0, IGNORED], [IGNORED, 2, 2, IGNORED, IGNORED]])
    pred = np.array([[0, 1, 0, 1, 2], [1, 2, 0, 1, 1]])  # words: right, wrong | right, wrong
    assert scores(pred, labels)["accuracy"].value == 0.5
    out = np.eye(3)[pred]
    reference = np.eye(3)[np.where(labels == IGNORED, 0, labels)]  # every word right
    lost = flips(out, reference, labels)
    assert (lost.losses, lost.gains, lost.rows) == (2, 0, 4)
    many = clustered_proportion(np.full(200, 8), np.full(200, 10))
    same_words_fewer_rows = clustered_proportion(np.array([800, 800]), np.array([1000, 1000]))
    assert many.value == same_words_fewer_rows.value == 0.8
    varied = clustered_proportion(np.r_[np.full(100, 10), np.full(100, 6)], np.full(200, 10))
    assert varied.low < 0.8 - 0.02 < 0.8 + 0.02 < varied.high  # rows that differ widen it


@pytest.mark.slow
def test_a_token_classifier_fine_tunes_distils_trains_with_qat_exports_quantizes_and_tags_words(tagger, tmp_path, cli):
    folder, rows, root = tagger
    data = write_jsonl(root / "tags.jsonl", rows)
    result = cli("train", folder, "--data", data, "-o", tmp_path / "tuned", "--epochs", "4", "--lr", "5e-3")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "tuned" / "edgepipe_train.json").read_text())
    before, after = record["eval_accuracy_before"], record["eval_accuracy"]
    assert record["task"] == "token-classification"
    assert after["low"] > 0.85 and after["value"] > before["value"] + 0.2, record["epochs"]
    result = cli("train", "--teacher", tmp_path / "tuned", "--keep-every", "2", "--data", data,
                 "-o", tmp_path / "student", "--epochs", "2", "--lr", "5e-3")
    assert result.exit_code == 0, result.output
    student = json.loads((tmp_path / "student" / "edgepipe_train.json").read_text())
    assert student["teacher"]["eval_accuracy"] == after and student["eval_accuracy"]["value"] > 0.8
    result = cli("train", tmp_path / "tuned", "--qat", "--data", data, "-o", tmp_path / "qat", "--epochs", "1",
                 "--lr", "1e-3")
    assert result.exit_code == 0, result.output
    qat = json.loads((tmp_path / "qat" / "edgepipe_train.json").read_text())
    assert qat["qat"]["layers"] > 0 and abs(qat["qat"]["fp32_eval_accuracy"]["value"] - after["value"]) < 1e-6
    assert cli("export", tmp_path / "tuned", "-o", tmp_path / "tuned.onnx").exit_code == 0
    result = cli("quantize", tmp_path / "tuned.onnx", "-o", tmp_path / "q.onnx", "--data", data, "--batch", "32",
                 "--json", tmp_path / "q.json", "--time-budget", "10")
    assert result.exit_code in (0, 1), result.output  # 1: no INT8 candidate faster on this CPU
    quantized = json.loads((tmp_path / "q.json").read_text())
    assert abs(quantized["fp32"]["accuracy"] - after["value"]) < 0.05  # words judged, as in training

    from edgepipe.runtime import Engine, TextClassifier, WordTagger

    engine = Engine(tmp_path / "tuned.onnx", providers="cpu")
    tagged = WordTagger(engine)(["not good film", ["the", "awful-plot", "great"]])
    assert [w["word"] for w in tagged[1]] == ["the", "awful-plot", "great"]
    assert all(w["tag"] in TAGS and 0 < w["score"] <= 1 for s in tagged for w in s)
    assert [w["tag"] for w in tagged[1]] == ["O", "B-NEG", "B-POS"]
    with pytest.raises(InputError, match="use WordTagger"):
        TextClassifier(engine)
    from edgepipe.serve.codec import TextIn

    with pytest.raises(InputError, match="tags each word"):
        TextIn(engine).feeds({"text": "good film"})
