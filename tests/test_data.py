"""Users' own data: the readers (CSV, JSONL, Parquet, save_to_disk, image folders), column and
label detection, the model's own preprocessing, and the intervals every accuracy figure carries.
No training and no export here (fast tier)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from byod import LABELS, sentences, word_tokenizer, write_csv, write_jsonl

from edgepipe import metrics
from edgepipe.data.labelled import load_labelled, pick_columns
from edgepipe.errors import InputError
from edgepipe.runtime.preprocess import IMAGE, TEXT, Preprocess, TextEncoder

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def text_pre(tmp_path_factory) -> Preprocess:
    folder = tmp_path_factory.mktemp("tok")
    word_tokenizer(folder)
    return Preprocess(TEXT, ("input_ids", "attention_mask", "token_type_ids"), LABELS, max_length=16,
                      tokenizer=(folder / "tokenizer.json").read_text())


def test_text_is_encoded_as_the_folders_own_tokenizer_does(tmp_path, text_pre):
    transformers = pytest.importorskip("transformers")
    word_tokenizer(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts, pairs = ["good film", "the plot was not very good at all"], ["bad", "great music"]
    ours = TextEncoder(text_pre).encode(texts, pairs)
    theirs = reference(texts, pairs, padding=True, return_tensors="np")
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_rows_longer_than_the_models_positions_are_cut_and_counted(text_pre):
    encoder = TextEncoder(text_pre)
    feeds = encoder.encode(["good " * 40, "bad film"])
    assert feeds["input_ids"].shape == (2, 16) and encoder.truncated == 1


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "saved"])
def test_every_table_format_reads_the_same_rows(tmp_path, text_pre, fmt):
    rows = sentences(60)
    if fmt in ("csv", "tsv"):
        path = tmp_path / f"d.{fmt}"
        text = "\n".join(["text\tlabel" if fmt == "tsv" else "text,label"]
                         + [f"{r['text']}{chr(9) if fmt == 'tsv' else ','}{r['label']}" for r in rows])
        path.write_text(text + "\n")
    elif fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets = pytest.importorskip("datasets")
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    named = load_labelled(path, text_pre, seed=3)
    reference = load_labelled(write_jsonl(tmp_path / "ref.jsonl", rows), text_pre, seed=3)
    np.testing.assert_array_equal(named.labels, reference.labels)
    np.testing.assert_array_equal(named.test["input_ids"], reference.test["input_ids"])
    assert len(named.labels) + len(named.calibration["input_ids"]) == 60
    assert set(named.labels) <= {0, 1}


def test_a_dataset_dict_judges_on_its_test_split_and_calibrates_on_train(tmp_path, text_pre):
    datasets = pytest.importorskip("datasets")
    train, test = sentences(50, seed=1), sentences(20, seed=2)
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(path))
    named = load_labelled(path, text_pre)
    assert named.labels.tolist() == [LABELS.index(r["label"]) for r in test]
    assert len(named.calibration["input_ids"]) == 50 and "'test' split judges" in named.split


def test_columns_are_found_by_their_usual_names_or_named(text_pre):
    assert pick_columns(["sentence1", "sentence2", "label"], text_pre, "d").inputs == ("sentence1", "sentence2")
    assert pick_columns(["review", "stars"], text_pre, "d", ("review",), "stars").label == "stars"
    with pytest.raises(InputError, match="has no text column .*its columns: body, y.*--input-column"):
        pick_columns(["body", "y"], text_pre, "d")
    with pytest.raises(InputError, match="has no column 'review'; its columns are text, label"):
        pick_columns(["text", "label"], text_pre, "d", ("review",))


@pytest.mark.parametrize("content, message", [
    ("text,label\ngood film,positive\nbad film,neutral\n", "row 2: label 'neutral' is not one of the model's labels "
                                                           r"\(negative, positive\)"),
    ("text,label\n", "has no rows"),
    ("text,label\ngood,7\n", "label '7' is not one of"),
])
def test_bad_labels_and_empty_files_are_one_line(tmp_path, text_pre, content, message):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_labelled(path, text_pre)


def test_labels_are_names_or_ids(text_pre):
    assert [text_pre.label_id(v) for v in ("positive", 0, "1", np.int64(1), "2", "maybe", None)] == \
        [1, 0, 1, 1, None, None, None]


def test_reading_stops_once_the_held_out_and_calibration_rows_are_full(tmp_path, text_pre):
    path = write_csv(tmp_path / "big.csv", sentences(5000))
    named = load_labelled(path, text_pre, max_test=30, max_calibration=40)
    assert len(named.labels) == 30 and len(named.calibration["input_ids"]) == 40
    assert "first 512 rows" in named.split  # one batch of the 5000 held them all


def test_an_image_that_cannot_be_read_is_named(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    pre = Preprocess(IMAGE, ("pixel_values",), ("cat",), image={
        "image_processor_type": "ViTImageProcessor", "size": {"height": 8, "width": 8}})
    with pytest.raises(InputError, match="cannot read image .*broken.png"):
        load_labelled(tmp_path, pre)


def test_a_model_without_preprocessing_says_how_to_get_it(tmp_path):
    from edgepipe.data.for_model import DataOptions, read_for_model

    path = write_csv(tmp_path / "d.csv", sentences(10))
    with pytest.raises(InputError, match="m.onnx carries no tokenizer or image processor.*export it from a Hugging "
                                         "Face"):
        read_for_model(path, None, "m.onnx", DataOptions())


def test_the_preprocessing_record_round_trips_through_json(text_pre):
    assert Preprocess.from_json(text_pre.to_json()) == text_pre
    image_pre = {"edgepipe.preprocess": json.dumps({"kind": "image", "inputs": ["x"]})}
    assert Preprocess.from_metadata(image_pre).kind == IMAGE


# --- intervals ---------------------------------------------------------------------------------

def test_an_accuracys_interval_holds_its_value_and_narrows_with_rows():
    small, large = metrics.proportion(8, 10), metrics.proportion(800, 1000)
    assert small.low < 0.8 < small.high and large.low < 0.8 < large.high
    assert (large.high - large.low) < (small.high - small.low) / 5
    # the Jeffreys interval for 8 of 10 is about [0.49, 0.96]
    assert small.low == pytest.approx(0.49, abs=0.03) and small.high == pytest.approx(0.96, abs=0.02)


def test_a_drop_with_no_flips_is_not_exactly_zero():
    drop = metrics.paired_drop(0, 0, 100)
    assert drop.value == 0 and drop.high > 0.005 and drop.low < 0


def test_the_budget_rule_within_over_unresolved_and_rows_needed():
    budget = 0.01
    within = metrics.paired_drop(2, 2, 5000)
    over = metrics.paired_drop(300, 0, 1000)
    straddle = metrics.paired_drop(3, 0, 400)
    assert metrics.resolution(within, budget) == metrics.WITHIN
    assert metrics.resolution(over, budget) == metrics.OVER
    assert metrics.resolution(straddle, budget) == metrics.UNRESOLVED
    more = metrics.rows_needed(straddle, budget, 400)
    assert more > 400  # a 0.75-point drop needs several times the rows to clear a 1-point budget
    # with that many rows at the same drop rate, the interval clears the budget (or nearly: an estimate)
    rows = 400 + more
    grown = metrics.paired_drop(round(0.0075 * rows), 0, rows)
    assert grown.high <= budget * 1.05


def test_macro_f1_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 4, 300))
    f1 = metrics.macro_f1(pred, labels)
    assert f1.value == pytest.approx(sklearn.f1_score(labels, pred, average="macro"))
    assert f1.low < f1.value < f1.high


def test_with_calibration_rows_from_elsewhere_every_row_judges(tmp_path, text_pre):
    path = write_csv(tmp_path / "d.csv", sentences(70))
    named = load_labelled(path, text_pre, test_fraction=1.0)
    assert len(named.labels) == 70 and named.split == "the first 70 rows of d.csv judge"


def test_a_bad_label_is_named_by_its_row_in_the_file(tmp_path, text_pre):
    rows = sentences(30)
    rows[17]["label"] = "neutral"
    with pytest.raises(InputError, match="row 18: label 'neutral'"):
        load_labelled(write_csv(tmp_path / "d.csv", rows), text_pre, seed=5)


def test_plain_text_for_a_classifier_says_what_it_takes(tmp_path, text_pre):
    path = tmp_path / "notes.txt"
    path.write_text("good film\n")
    with pytest.raises(InputError, match="holds no labelled rows; a classifier takes CSV/TSV.*plain .txt is for "
                                         "language"):
        load_labelled(path, text_pre)
