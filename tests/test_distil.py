"""Distillation's parts, without training: the student cut from a teacher keeps its layers'
weights, and the loss blends the labels' cross-entropy with the KL from the teacher."""

from __future__ import annotations

import pytest
import torch
from byod import text_classifier

from edgepipe.errors import InputError
from edgepipe.models.distil import distillation_loss, student_from_teacher

transformers = pytest.importorskip("transformers")


def test_a_student_keeps_every_kth_layer_of_its_teacher_with_their_weights(tmp_path):
    teacher = text_classifier(tmp_path / "teacher")
    config = transformers.AutoConfig.from_pretrained(teacher)
    config.num_hidden_layers = 4
    transformers.BertForSequenceClassification(config).save_pretrained(teacher)  # 4 layers, tokenizer kept
    student = student_from_teacher(teacher, tmp_path / "student", keep_every=2)
    t = transformers.BertForSequenceClassification.from_pretrained(teacher).state_dict()
    s = transformers.BertForSequenceClassification.from_pretrained(student).state_dict()
    assert transformers.AutoConfig.from_pretrained(student).num_hidden_layers == 2
    for key, value in s.items():
        source = key.replace("layer.1.", "layer.2.")  # student layer j is teacher layer 2j
        assert torch.equal(value, t[source]), key
    assert (student / "tokenizer.json").is_file()
    with pytest.raises(InputError, match="every k-th"):
        student_from_teacher(teacher, tmp_path / "bad", keep_every=5)
    (teacher / "edgepipe_pruned.json").write_text('{"shapes": {}, "attributes": {}}')
    with pytest.raises(InputError, match="is a pruned folder"):
        student_from_teacher(teacher, tmp_path / "bad", keep_every=2)


def test_the_loss_is_the_task_loss_at_weight_0_and_only_the_kl_at_weight_1():
    torch.manual_seed(0)
    student, teacher, task = torch.randn(8, 3), torch.randn(8, 3), torch.tensor(0.7)
    assert torch.isclose(distillation_loss(student, teacher, task, 2.0, 0.0), task)
    assert torch.isclose(distillation_loss(teacher, teacher, task, 2.0, 1.0), torch.tensor(0.0), atol=1e-6)
    apart = distillation_loss(student, teacher, task, 2.0, 1.0)
    manual = torch.nn.functional.kl_div(torch.log_softmax(student / 2, -1), torch.softmax(teacher / 2, -1),
                                        reduction="batchmean") * 4
    assert apart > 0 and torch.isclose(apart, manual)
