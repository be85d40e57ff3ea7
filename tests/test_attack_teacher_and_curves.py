"""The free teacher (its answers and logits) and training curves that stop at the target and resume."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_moe
from moeguard.attack.carver import AttackTask, carve_and_realign, labelled_pool
from moeguard.attack.curves import CurveSchedule, flops_per_token, train_curve
from moeguard.attack.students import carve, uniform_keep_sets
from moeguard.attack.teacher import Distillation, answer_kl, labelled, teacher_answers
from moeguard.data import Example, TaskData, batches, build_char_tokenizer, load_task
from moeguard.errors import DataError
from moeguard.eval import evaluate
from moeguard.models import load_moe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_answer_kl_is_zero_for_the_same_distribution_and_matches_its_formula():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    assert answer_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    p, log_p, log_q = teacher.softmax(-1), teacher.log_softmax(-1), student.log_softmax(-1)
    assert answer_kl(student, teacher).item() == pytest.approx((p * (log_p - log_q)).sum(-1).mean().item(), rel=1e-5)
    assert answer_kl(student, teacher).item() > 0


def test_distillation_pulls_a_student_towards_the_teachers_answer_distribution():
    tokenizer = build_char_tokenizer()
    teacher, student = tiny_moe("qwen3_moe"), tiny_moe("qwen3_moe")
    with torch.no_grad():
        for param in student.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    batch = next(batches(tokenizer, load_task("upper", "train", limit=8), batch_size=8))
    loss = Distillation(teacher)
    outputs = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    value = loss(student, batch, outputs)
    value.backward()
    assert value.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.parameters())
    assert all(p.grad is None for p in teacher.model.parameters())
    same = loss(teacher, batch, teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    assert same.item() == pytest.approx(0.0, abs=1e-5)


def test_the_teacher_labels_prompts_with_its_own_answers(trained_tiny):
    moe = load_moe(trained_tiny)
    prompts = load_task("reverse", "pool", limit=24)
    answers = teacher_answers(moe, prompts)
    assert answers == [p.strip() for p in evaluate(moe, None, prompts).predictions]
    data = labelled(prompts, answers, "teacher")
    assert [e.prompt for e in data] == [e.prompt for e in prompts] and [e.answer for e in data] == answers
    choice = TaskData("pick", "choice", [Example(prompt="rev ab=", choices=("ab", "ba"), label=0)] * 3)
    picked = evaluate(moe, None, choice).predictions
    assert teacher_answers(moe, choice) == [e.choices.index(p) for e, p in zip(choice, picked)]
    with pytest.raises(DataError, match="answers"):
        teacher_answers(moe, TaskData("text", "lm", [Example(text="abc")]))


def test_the_labelled_pool_is_saved_by_chunks_and_read_back(trained_tiny, tmp_path):
    from moeguard.runs import Run

    moe = load_moe(trained_tiny)
    prompts = load_task("reverse", "pool", limit=40)
    run = Run.open(tmp_path, "test", {})
    first = labelled_pool(moe, prompts, 30, run)
    assert len(first) == 30 and run.computed == 1
    again = labelled_pool(moe, prompts, 30, run)
    assert again.examples == first.examples and run.reused == 1 and run.computed == 1


@pytest.mark.slow
def test_a_curve_stops_at_the_first_evaluation_over_the_target_and_is_read_back_when_finished(trained_tiny, tmp_path):
    moe = load_moe(trained_tiny)
    task = AttackTask.builtin("upper", prompts=640, test_size=40)
    data = labelled_pool(moe, task.prompts, 640)
    full = evaluate(moe, None, task.test).value
    schedule = CurveSchedule(batch_size=16, warmup=5, evaluate_every=5, eval_batch_size=64)
    configuration = {"selection": "attribution", "lr": 3e-3, "loss": "logits", "router_reinit": True}
    attacked = carve_and_realign(moe, data, task.test, 2, configuration, target=0.9 * full, max_steps=40,
                                 schedule=schedule, out=tmp_path / "carve", save_model=True)
    curve = attacked.curve
    steps = [p.step for p in curve.points]
    assert steps[0] == 0 and all(s % 5 == 0 for s in steps) and steps == sorted(steps)
    reached = [p.accuracy >= curve.target for p in curve.points]
    assert not any(reached[:-1])  # it stopped at the first evaluation at or above the target, or at the cap
    assert reached[-1] or steps[-1] == 40
    assert curve.overhead_flops > 0 and curve.flops_per_token == flops_per_token(attacked.model, moe, "logits")
    assert [p.tokens for p in curve.points] == sorted(p.tokens for p in curve.points)
    again = carve_and_realign(moe, data, task.test, 2, configuration, target=0.9 * full, max_steps=40,
                              schedule=schedule, out=tmp_path / "carve", save_model=True)
    assert again.curve.points == curve.points and again.model.fingerprint() == attacked.model.fingerprint()
    # A never-reachable target trains to the cap: the run is censored at what it spent.
    student = carve(moe, uniform_keep_sets(moe, 2))
    capped = train_curve(student, moe, data, task.test, target=math.inf, lr=1e-3, loss="answers", seed=0, max_steps=12,
                         schedule=schedule)
    assert [p.step for p in capped.points] == [0, 5, 10, 12] and not capped.cost().reached


def test_a_configuration_that_diverges_ends_its_curve_unreached(trained_tiny):
    moe = load_moe(trained_tiny)
    data = labelled_pool(moe, load_task("upper", "pool", limit=64), 64)
    student = carve(moe, uniform_keep_sets(moe, 2))
    schedule = CurveSchedule(batch_size=8, warmup=0, evaluate_every=2, eval_batch_size=32)
    curve = train_curve(student, moe, data, load_task("upper", "test", limit=16), target=math.inf, lr=1e8,
                        loss="answers", seed=0, max_steps=30, schedule=schedule)
    assert curve.diverged and not curve.cost().reached
    assert curve.points[0].step == 0 and curve.points[-1].step < 30


def test_a_compute_cap_stops_a_curve_after_the_step_that_reaches_it_and_evaluates_it_there(trained_tiny):
    moe = load_moe(trained_tiny)
    data = labelled_pool(moe, load_task("upper", "pool", limit=96), 96)
    test = load_task("upper", "test", limit=8)
    schedule = CurveSchedule(batch_size=8, warmup=0, evaluate_every=2, eval_batch_size=8)

    def run(max_flops=None):
        student = carve(moe, uniform_keep_sets(moe, 2))
        return train_curve(student, moe, data, test, target=math.inf, lr=1e-3, loss="answers", seed=0, max_steps=10,
                           schedule=schedule, max_flops=max_flops)

    free = run()
    assert [p.step for p in free.points] == [0, 2, 4, 6, 8, 10] and not free.stopped_by_compute
    # A cap just above the compute after 4 steps: step 5 reaches it, and is evaluated.
    cap = free.points[2].tokens * free.flops_per_token * 1.001
    capped = run(cap)
    assert [p.step for p in capped.points] == [0, 2, 4, 5]
    assert capped.stopped_by_compute and not capped.cost().reached and capped.cost().flops >= cap
    assert capped.points[2].tokens == free.points[2].tokens  # the same data order up to the stop
    assert free.points[2].tokens < capped.points[-1].tokens < free.points[3].tokens


@pytest.mark.slow
def test_a_bounded_head_start_runs_the_carve_first_and_stops_scratch_at_the_multiple(trained_tiny, tmp_path):
    from moeguard.attack import HeadStartSettings, measure_head_start

    moe = load_moe(trained_tiny)
    # Keeping every expert, the carve is at the target before any training: its cost is the selection's forward passes.
    settings = HeadStartSettings(selections=("attribution",), carve_lrs=(3e-3,), scratch_lrs=(3e-3,), losses=("logits",),
                                 try_router_reinit=False, try_canonicalise=False, carve_steps=10, scratch_steps=40,
                                 scratch_compute_multiple=1.5, student_batch=8, evaluate_every=2, tuning_seeds=(),
                                 report_seeds=(0,), curve_test_size=16, selection_examples=16, resamples=10)
    task = AttackTask.builtin("upper", prompts=settings.prompts_needed(), test_size=16)
    result = measure_head_start(moe, task, max(moe.num_experts), settings, out=tmp_path)
    carve_cost = result.carve.costs()[0]
    assert carve_cost.reached and carve_cost.steps == 0 and carve_cost.flops > 0
    scratch = result.scratch.curves[0]
    cap = 1.5 * carve_cost.flops
    assert scratch.max_flops == pytest.approx(cap) and result.scratch_compute_multiple == 1.5
    if not scratch.cost(result.target).reached:
        flops = [p.tokens * scratch.flops_per_token for p in scratch.points]
        assert scratch.stopped_by_compute and flops[-1] >= cap
        # It stopped after the step that reached the cap: one batch less was below it.
        assert flops[-1] - cap < 2 * flops[-1] / scratch.points[-1].step
        h = result.head_start["flops"]
        assert h.bound == "lower" and h.value >= 1.5 and "1.5x the carve's compute" in result.describe()
    assert result.to_dict()["scratch_compute_multiple"] == 1.5


@pytest.mark.slow
def test_the_attacker_is_tuned_as_the_head_start_tunes_it_and_runs_on_tuning_seeds_only(trained_tiny, tmp_path):
    from moeguard.attack import HeadStartSettings, tune_attacker

    moe = load_moe(trained_tiny)
    settings = HeadStartSettings(selections=("attribution",), carve_lrs=(3e-3, 1e-3), losses=("logits",),
                                 try_router_reinit=False, carve_steps=10, scratch_steps=10, student_batch=8,
                                 evaluate_every=5, tuning_seeds=(7,), report_seeds=(0,), curve_test_size=16,
                                 selection_examples=16)
    task = AttackTask.builtin("upper", prompts=settings.prompts_needed(), test_size=16)
    tuning = tune_attacker(moe, task, 2, settings, out=tmp_path)
    assert set(tuning.tried) == {"selection=attribution/lr=0.003/loss=logits/router_reinit=False/canonicalise=False",
                                 "selection=attribution/lr=0.001/loss=logits/router_reinit=False/canonicalise=False"}
    assert tuning.chosen["lr"] in (3e-3, 1e-3) and tuning.seeds == (7,)
    runs = sorted(p.parent.name for p in (tmp_path / "carve").rglob("curve.json"))
    assert runs == ["seed7", "seed7"]  # no report seed was run
