"""A pipeline whose source is a Hugging Face folder and whose dataset is labelled rows: train
fine-tunes the folder on them, prune cuts and recovers it, export takes the pruned folder, and a
resumed run reuses every stage; the same judged rows run through every stage."""

from __future__ import annotations

import json
import textwrap

import pytest
from byod import sentences, text_classifier, write_csv

from edgepipe.errors import ConfigError
from edgepipe.pipeline import config as config_mod
from edgepipe.pipeline import run_pipeline

pytest.importorskip("transformers")

CONFIG = textwrap.dedent("""
    out_dir = "run"
    stages = [{stages}]
    [train]
    epochs = 3
    lr = 3e-3
    [prune]
    ratio = 0.5
    round_to = 1
    finetune_epochs = 1
    lr = 1e-3
    batch_sizes = [32]
    [quantize]
    time_budget_s = 10
    [budgets]
    require_int8 = false
    min_int8_speedup = 0.5
    max_prune_accuracy_drop = 0.1
    [[models]]
    name = "reviews"
    source = "bert"
    dataset = "{dataset}"
""")
STAGES = '"train", "prune", "export", "quantize", "profile"'


@pytest.mark.slow
def test_a_folder_is_fine_tuned_pruned_exported_and_quantized_on_its_rows_and_a_resume_reuses_it(tmp_path):
    text_classifier(tmp_path / "bert")
    write_csv(tmp_path / "rows.csv", sentences(300))
    path = tmp_path / "pipeline.toml"
    path.write_text(CONFIG.format(stages=STAGES, dataset="rows.csv"))
    result = run_pipeline(config_mod.load(path))
    assert result.ok, result.failed_gates
    stages = result.manifest["models"]["reviews"]["stages"]
    train, prune = stages["train"], stages["prune"]
    assert train["status"] == "ok" and train["record"]["task"] == "text-classification"
    assert train["record"]["eval_accuracy"]["value"] > train["record"]["eval_accuracy_before"]["value"] + 0.2
    tuned, pruned = tmp_path / "run" / "reviews" / "tuned", tmp_path / "run" / "reviews" / "pruned"
    assert (tuned / "tokenizer.json").is_file() and (pruned / "edgepipe_pruned.json").is_file()
    # each stage read what the one before it wrote
    assert prune["inputs"][0]["sha256"] == train["outputs"][0]["sha256"]
    assert stages["export"]["inputs"][0]["sha256"] == prune["outputs"][0]["sha256"]
    assert prune["record"]["params_after"] < prune["record"]["params_before"]
    # quantize judged the rows the fine-tuning held out: the exported model scores as training did
    fp32 = stages["quantize"]["record"]["fp32"]["scores"]["accuracy"]["value"]
    assert abs(fp32 - prune["record"]["accuracy_after"]) <= 0.05, (fp32, prune["record"]["accuracy_after"])
    labels = [row["stage"] for row in result.rows]
    assert labels[0] == "train" and labels[1].startswith("prune (") and "prune (" in result.table()
    again = run_pipeline(config_mod.load(path), resume=True)
    assert again.ok and all(s["status"] in ("ok", "refused") for s in again.manifest["models"]["reviews"][
        "stages"].values())
    assert (json.loads((tmp_path / "run" / "manifest.json").read_text())["models"]["reviews"]["stages"]["train"]
            ["seconds"] == train["seconds"])  # reused, not run again


def test_pruning_a_folder_without_rows_is_refused_before_any_work(tmp_path):
    text_classifier(tmp_path / "bert")
    path = tmp_path / "pipeline.toml"
    path.write_text(CONFIG.format(stages='"prune", "export"', dataset="x.npz").replace(
        'dataset = "x.npz"\n', ""))
    with pytest.raises(ConfigError, match="pruning the folder .* needs labelled rows"):
        config_mod.load(path)


def test_the_training_page_pipeline_is_a_valid_config(tmp_path):
    import re
    import tomllib
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "training.md"
    (block,) = re.findall(r"```toml\n(.*?)```", page.read_text(), flags=re.S)
    text_classifier(tmp_path / "my-bert")
    write_csv(tmp_path / "reviews.csv", sentences(20))
    config = config_mod.from_dict(tomllib.loads(block), base_dir=tmp_path)
    (model,) = config.models
    assert model.fine_tunes and config.stages[:2] == ("train", "prune")
    settings = config_mod.stage_configs(model, config.seed)
    assert (settings["train"].epochs, settings["prune"].steps, settings["prune"].lr) == (3, 1, 1e-4)
