"""The attacks of the robustness benchmark: students, checkpoints, the pluggable re-aligner."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_moe

from moeguard.data import build_char_tokenizer, load_task
from moeguard.realign import RealignData
from moeguard.watermark import Watermark, builtin_record
from moeguard.watermark.robustness import distill_attack, finetune_attack, fresh_student, realign_attack, teacher_labelled

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = build_char_tokenizer()
WATERMARK = Watermark(builtin_record(("upper",), triggers_per_task=4), "owner-key-0001")


def char_moe():
    moe = tiny_moe("qwen3_moe", vocab=len(TOKENIZER))
    moe.tokenizer = TOKENIZER
    return moe


def test_a_fresh_student_has_the_carved_architecture_and_none_of_the_parent_weights():
    parent = char_moe()
    keep = {layer.index: [1, 5] for layer in parent.layers}
    student = fresh_student(parent, keep, seed=3)
    assert student.num_experts == [2] * parent.num_layers and student.top_k == parent.top_k
    assert student.config.hidden_size == parent.config.hidden_size
    assert parent.num_experts == [8] * parent.num_layers  # the parent is untouched
    parent_matrices = [p for p in parent.model.parameters() if p.ndim > 1]
    student_matrices = [p for p in student.model.parameters() if p.ndim > 1]
    assert student_matrices
    for matrix in student_matrices:
        assert not any(matrix.shape == q.shape and torch.allclose(matrix, q) for q in parent_matrices)


def test_teacher_labels_are_the_models_own_answers():
    moe = char_moe()
    data = load_task("upper", "pool", limit=6)
    labelled = teacher_labelled(moe, data)
    assert [e.prompt for e in labelled] == [e.prompt for e in data]
    from moeguard.eval import evaluate

    assert [e.answer for e in labelled] == evaluate(moe, TOKENIZER, data).predictions


def test_attacks_report_checkpoints_along_the_way_and_leave_the_model_alone():
    moe = char_moe()
    before = [p.detach().clone() for p in moe.model.parameters()]
    train_data = load_task("upper", "train", limit=32)
    test = load_task("upper", "test", limit=8)
    keep = {layer.index: [0, 1] for layer in moe.layers}
    tuned = finetune_attack(moe, WATERMARK, train_data, [test], keep=keep, steps=4, every=2, lr=1e-3, batch_size=8)
    assert [p.steps for p in tuned] == [0, 2, 4] and {p.attack for p in tuned} == {"carve+finetune"}
    assert all(p.triggers == 4 and 0 <= p.accuracy <= 1 for p in tuned)
    distilled = distill_attack(moe, WATERMARK, train_data, test, keep, steps=4, every=4, batch_size=8)
    assert [p.steps for p in distilled] == [0, 4] and distilled[0].settings["experts"] == 2
    uneven = finetune_attack(moe, WATERMARK, train_data, [test], keep=keep, steps=3, every=2, lr=1e-3, batch_size=8)
    assert [p.steps for p in uneven] == [0, 2, 3]  # the last step is measured too

    reported = []

    def realigner(model, data, kept, report):  # a stand-in for a stronger attacker: it only reports
        assert kept == keep and data.pool.source.startswith("answers of")
        with model.mask_experts(kept):
            report(0)
            report(7)
        reported.append(True)

    points = realign_attack(moe, WATERMARK, RealignData(load_task("upper", "pool", limit=8), test), keep, realigner)
    assert reported and [p.steps for p in points] == [0, 7]
    assert all(torch.equal(a, b) for a, b in zip(before, moe.model.parameters()))
