"""The defense evaluation's outputs, drawn from its result: ``defense_eval.json``, ``defense_eval.md`` and
``figures/*.png`` (:func:`write_report`)."""

from __future__ import annotations

import math
from pathlib import Path

from moeguard.attack.tuning import configuration_label
from moeguard.defense.evaluation import DefenseEvaluation
from moeguard.io import atomic_write_text, write_json
from moeguard.attack.headstart import BOUND_MARKS
from moeguard.plotting import pyplot, save_figure

RESULT_NAME, TABLE_NAME, FIGURES_DIR = "defense_eval.json", "defense_eval.md", "figures"
GOAL_HEAD_START, GOAL_UTILITY_POINTS = 2.0, 1.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _steps(costs: list, censored_mark: str = ">=") -> str:
    mean = _mean([c.steps for c in costs])
    return f"{censored_mark if not all(c.reached for c in costs) else ''}{mean:.0f}"


def markdown_tables(evaluation: DefenseEvaluation) -> str:
    """Every table of the evaluation, as markdown."""
    settings = evaluation.settings
    hs = settings["headstart"]
    models = evaluation.models
    base = evaluation.baseline
    tasks = list(settings["tasks"])
    lines = [
        f"Target tasks: {', '.join(f'`{t}`' for t in settings['target_tasks'])}; attack keep counts "
        f"{', '.join(map(str, settings['attack_keeps']))}; target {hs['target_share']:.0%} of each model's own test "
        f"accuracy ({hs['curve_test_size']} test examples). Both arms train on the model's own answers (batch "
        f"{hs['student_batch']}, {hs['warmup_steps']} warm-up steps then a constant learning rate, evaluated every "
        f"{hs['evaluate_every']} steps; caps {hs['carve_steps']} carve / {hs['scratch_steps']} scratch steps). "
        f"Configurations chosen on tuning seeds {list(hs['tuning_seeds'])} ({hs['tuning']} search), reported on seeds "
        f"{list(hs['report_seeds'])}; intervals: 95% bootstrap over those seeds.",
        "",
        "**Utility** (the full model's score on every task in its metric: exact-match accuracy unless the task says "
        "otherwise; a language-modelling loss is lower-is-better and left out of the largest drop)",
        "",
        "| model | " + " | ".join(tasks) + " | largest drop vs undefended |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for model in models:
        lines.append(f"| {model.name} | " + " | ".join(f"{model.utility[t]:.3f}" for t in tasks)
                     + f" | {evaluation.utility_loss(model):.1f} pts |")
    keeps = [str(k) for k in settings["keeps"]]
    lines += [
        "",
        "**Knowledge loss**: target-task accuracy retained after pruning without re-alignment, by the best criterion "
        "(named); attribution on the model itself",
        "",
        "| model | task | " + " | ".join(f"keep {k}" for k in keeps) + " |",
        "|---|---|" + "---|" * len(keeps),
    ]
    for model in models:
        for task, knowledge in model.knowledge.items():
            cells = []
            for keep in keeps:
                best = max(knowledge, key=lambda c: knowledge[c][keep])
                cells.append(f"{model.best_knowledge[task][keep]:.3f} ({best})")
            lines.append(f"| {model.name} | {task} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Head start** H = C_scratch / C_carve (FLOPs: 6 x active parameters x training tokens, 2 x for teacher "
        "labels, teacher logits and the carve's own forward passes; tokens: training tokens only). `>=`: some scratch "
        "runs did not reach the target within their cap (H is a lower bound); `<=`: some carve runs did not (an upper "
        "bound). Steps: mean optimizer steps to the target (interpolated).",
        "",
        "| model | task | keep | H (FLOPs) [95% CI] | H (tokens) [95% CI] | carve: steps | carve configuration "
        "| scratch: steps | scratch configuration | carve runs reached |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for key, reason in model.skipped.items():
            task, keep = key.split("/keep")
            lines.append(f"| {model.name} | {task} | {keep} | skipped: {reason} | | | | | | |")
        for key, result in model.headstart.items():
            carve, scratch = result.carve.costs(result.target), result.scratch.costs(result.target)
            lines.append(
                f"| {model.name} | {result.task} | {result.keep} | {result.head_start['flops'].describe()} | "
                f"{result.head_start['tokens'].describe()} | {_steps(carve)} | {configuration_label(result.carve.chosen)} | "
                f"{_steps(scratch)} | {configuration_label(result.scratch.chosen)} | "
                f"{sum(c.reached for c in carve)}/{len(carve)} |"
            )
    if any(model.labels for model in models):
        lines += [
            "",
            "**Labels to the target** (the paper's regime: the attacker pays for labels; the same carve), mean over "
            "the report seeds; `+`: some runs did not reach the target within the budget (counted at the budget); "
            "multiplier: defended / undefended with its 95% bootstrap interval",
            "",
            "| model | task/keep | labels to target | configuration | label multiplier |",
            "|---|---|---|---|---|",
        ]
        for model in models:
            for key, labels in model.labels.items():
                multiplier = evaluation.label_multiplier(model, key)
                mean = _mean(labels.labels)
                lines.append(f"| {model.name} | {key} | {mean:.0f}{'+' if labels.censored else ''} | "
                             f"{configuration_label(labels.tuning.chosen)} | "
                             f"{multiplier.describe() if multiplier else '-'} |")
    permitted = ", ".join(settings["permitted"])
    lines += [
        "",
        f"**Authorised use**: fine-tune of the permitted groups ({permitted}) only, {settings['authorised_steps']} steps "
        f"at lr {settings['authorised_lr']:g}, on a task no model was trained on (`{base.authorised.get('task', '')}`), "
        "then `verify` against the protocol",
        "",
        "| model | accuracy before | accuracy after | protocol verdict |",
        "|---|---|---|---|",
    ]
    for model in models:
        a = model.authorised
        verdict = "compliant" if a["compliant"] else f"{len(a['violations'])} violation(s)"
        lines.append(f"| {model.name} | {a['accuracy_before']:.3f} | {a['accuracy_after']:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def utility_figure(evaluation: DefenseEvaluation, path: Path) -> Path:
    plt = pyplot()
    tasks = list(evaluation.settings["tasks"])
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(tasks)), 3.8))
    width = 0.8 / len(evaluation.models)
    for number, model in enumerate(evaluation.models):
        xs = [i + (number - (len(evaluation.models) - 1) / 2) * width for i in range(len(tasks))]
        axis.bar(xs, [model.utility[t] for t in tasks], width=width, label=model.name)
    axis.set_xticks(range(len(tasks)), tasks)
    axis.set_ylabel("score (exact-match accuracy unless the task says otherwise)")
    axis.set_title("utility of the full model")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def knowledge_figure(evaluation: DefenseEvaluation, path: Path) -> Path:
    plt = pyplot()
    keeps = list(evaluation.settings["keeps"])
    tasks = list(evaluation.settings["target_tasks"])
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for model in evaluation.models:
            axis.plot(keeps, [model.best_knowledge[task][str(k)] for k in keeps], marker="o", label=model.name)
        axis.axhline(evaluation.settings["headstart"]["target_share"], color="0.5", linewidth=0.8, linestyle=":")
        axis.invert_xaxis()
        axis.set_xlabel("experts kept per layer")
        axis.set_ylabel("target accuracy retained")
        axis.set_title(f"knowledge loss on {task} (best criterion)")
    axes[0][0].legend(fontsize=8)
    return save_figure(figure, path)


def headstart_curves_figure(evaluation: DefenseEvaluation, path: Path) -> Path:
    """Accuracy against compute: the scratch arm and every model's carve, one panel per task and keep."""
    plt = pyplot()
    keys = list(evaluation.baseline.headstart)
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, key in zip(axes[0], keys):
        reference = evaluation.baseline.headstart[key]
        for curve in reference.scratch.curves:
            shown = [p for p in curve.points if p.tokens > 0]  # a log axis has no zero
            axis.plot([p.tokens * curve.flops_per_token for p in shown], [p.accuracy for p in shown],
                      color="0.55", linewidth=0.9, label="from scratch" if curve is reference.scratch.curves[0] else None)
        for number, model in enumerate(evaluation.models):
            result = model.headstart.get(key)
            if result is None:
                continue
            for curve in result.carve.curves:
                shown = [p for p in curve.points if curve.overhead_flops + p.tokens > 0]
                xs = [curve.overhead_flops + p.tokens * curve.flops_per_token for p in shown]
                axis.plot(xs, [p.accuracy for p in shown], color=colours[number % len(colours)], linewidth=0.9,
                          label=f"carve of {model.name}" if curve is result.carve.curves[0] else None)
            axis.axhline(result.target, color=colours[number % len(colours)], linewidth=0.6, linestyle=":")
        axis.set_xscale("log")
        axis.set_xlabel("compute (FLOPs)")
        axis.set_ylabel("test accuracy")
        axis.set_title(f"{reference.task}, keep {reference.keep}")
    axes[0][0].legend(fontsize=7)
    return save_figure(figure, path)


def headstart_vs_utility_figure(evaluation: DefenseEvaluation, path: Path) -> Path:
    """The head start (FLOPs, with its interval) against the utility lost, per model, task and keep."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    markers = "osD^v<>"
    keys = list(evaluation.baseline.headstart)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    axis.axvspan(-0.5, GOAL_UTILITY_POINTS, ymin=0, ymax=1, color="tab:green", alpha=0.06)
    axis.axhline(GOAL_HEAD_START, color="tab:green", linewidth=0.8, linestyle="--", label=f"goal: H <= {GOAL_HEAD_START:g}")
    for number, model in enumerate(evaluation.models):
        loss = evaluation.utility_loss(model)
        for index, key in enumerate(keys):
            result = model.headstart.get(key)
            if result is None:
                continue
            h = result.head_start["flops"]
            value = h.value if math.isfinite(h.value) else h.interval.high
            x = loss + (index - (len(keys) - 1) / 2) * 0.08
            axis.errorbar([x], [value], yerr=[[max(0.0, value - h.interval.low)], [max(0.0, h.interval.high - value)]],
                          marker=markers[index % len(markers)], color=colours[number % len(colours)], capsize=3,
                          linestyle="none", label=f"{model.name}: {key}")
            if h.bound != "exact":
                axis.annotate(BOUND_MARKS[h.bound].strip(), (x, value), fontsize=7,
                              xytext=(4, 2), textcoords="offset points")
    axis.set_yscale("log")
    axis.set_xlabel("largest utility loss vs undefended (points)")
    axis.set_ylabel("head start H (FLOPs)")
    axis.set_title("carver's head start vs utility cost")
    axis.legend(fontsize=6, ncol=2)
    return save_figure(figure, path)


def write_report(evaluation: DefenseEvaluation, out: Path) -> None:
    """Write the figures, then ``defense_eval.json`` and ``defense_eval.md``, into ``out``."""
    out = Path(out)
    figures = out / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    paths = {
        "utility": utility_figure(evaluation, figures / "utility.png"),
        "knowledge_loss": knowledge_figure(evaluation, figures / "knowledge_loss.png"),
    }
    if any(model.headstart for model in evaluation.models):  # every attack skipped: no curve to draw
        paths["headstart_curves"] = headstart_curves_figure(evaluation, figures / "headstart_curves.png")
        paths["headstart_vs_utility"] = headstart_vs_utility_figure(evaluation, figures / "headstart_vs_utility.png")
    evaluation.figures = {name: str(p) for name, p in paths.items()}
    write_json(out / RESULT_NAME, evaluation.to_dict())
    atomic_write_text(out / TABLE_NAME, markdown_tables(evaluation))

