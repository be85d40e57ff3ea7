"""The defense evaluation's outputs, drawn from its result: ``defense_eval.json``, ``defense_eval.md`` and
``figures/*.png`` (:func:`write_report`)."""

from __future__ import annotations

import math
from pathlib import Path

from moeguard.defense.costs import GridCost, configuration_label
from moeguard.defense.evaluation import DefenseEvaluation
from moeguard.io import atomic_write_text, write_json
from moeguard.plotting import pyplot, save_figure
from moeguard.realign.figures import recovery_figure

RESULT_NAME, TABLE_NAME, FIGURES_DIR = "defense_eval.json", "defense_eval.md", "figures"


def _cost(cost: GridCost, budget_note: bool = True) -> str:
    if math.isnan(cost.best_cost):
        return "-"
    mark = ">=" if cost.censored and budget_note else ""
    return f"{mark}{cost.best_cost:.0f}"


def _multiplier(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}x"


def _reached(entry: dict, key: str) -> str:
    prefix = "" if entry["reached"] == entry["runs"] else ">="
    return f"{prefix}{entry[key]:.0f}"


def markdown_tables(evaluation: DefenseEvaluation) -> str:
    """Every table of the evaluation, as markdown."""
    settings = evaluation.settings
    attack = settings["attack"]
    models = evaluation.models
    base = evaluation.baseline
    tasks = list(settings["tasks"])
    lines = [
        f"Target task of the attacker: `{settings['target_task']}`; test sets of {settings['test_size']} examples; "
        f"target retention {attack['target_retention']:.0%}; each attack run has a budget of {attack['budget']} labels "
        f"in {attack['rounds']} rounds of {attack['steps_per_round']} steps (batch {attack['batch_size']}, "
        f"{attack['acquisition']} acquisition); grid {len(settings['criteria'])} criteria x {len(settings['scopes'])} "
        f"scopes x {len(settings['lrs'])} learning rates x {len(settings['seeds'])} seeds per keep count.",
        "",
        "**Utility** (the full model's score on every task in its metric: exact-match accuracy unless the task says "
        "otherwise; a language-modelling loss is lower-is-better and left out of the largest drop)",
        "",
        "| model | " + " | ".join(tasks) + " | largest drop vs undefended |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    scored = [t for t in tasks if base.scoring.get(t, {}).get("higher_is_better", True)]
    for model in models:
        drop = max((base.utility[t] - model.utility[t] for t in scored), default=0.0)
        lines.append(f"| {model.name} | " + " | ".join(f"{model.utility[t]:.3f}" for t in tasks) + f" | {drop * 100:.1f} pts |")
    keeps = [str(k) for k in settings["keeps"]]
    lines += [
        "",
        "**Knowledge loss**: target-task accuracy retained after pruning without re-alignment, by the attacker's best "
        "criterion (named); every criterion's attribution is computed on the model itself",
        "",
        "| model | " + " | ".join(f"keep {k}" for k in keeps) + " |",
        "|---|" + "---|" * len(keeps),
    ]
    for model in models:
        cells = []
        for keep in keeps:
            best = max(model.knowledge, key=lambda c: model.knowledge[c][keep])
            cells.append(f"{model.best_knowledge[keep]:.3f} ({best})")
        lines.append(f"| {model.name} | " + " | ".join(cells) + " |")
    for keep in map(str, settings["attack_keeps"]):
        lines += [
            "",
            f"**Attack cost at keep {keep}**: labels and optimizer steps to reach the target retention. Worst case = the "
            "attacker's best configuration (mean over its seeds); mean = over all configurations; `>=`: some runs did "
            "not reach the target within the budget, which then counts as their cost (a lower bound).",
            "",
            "| model | worst case: labels | steps | attacker's best configuration | mean: labels | steps | runs reached "
            "| multiplier, worst case (labels / steps) | multiplier, mean (labels / steps) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for model in models:
            attacks = model.attacks[keep]
            m = evaluation.multipliers(model, keep)
            best = configuration_label(attacks.labels.best) if attacks.labels.best else "-"
            lines.append(
                f"| {model.name} | {_cost(attacks.labels)} | {_cost(attacks.steps)} | {best} | {attacks.labels.mean_cost:.0f} | "
                f"{attacks.steps.mean_cost:.0f} | {attacks.labels.reached}/{attacks.labels.runs} | "
                f"{_multiplier(m['labels_worst_case'])} / {_multiplier(m['steps_worst_case'])} | "
                f"{_multiplier(m['labels_mean'])} / {_multiplier(m['steps_mean'])} |"
            )
    lines += [
        "",
        "**Adaptive attacks** with the attacker's best configuration at each keep (distillation: the pruned student "
        "learns the full model's own answers on the pool, no human label; router re-init: fresh random routers, then "
        "re-alignment of everything with labels)",
        "",
        "| model | keep | distillation: steps to target | final retention | router re-init: labels to target | steps "
        "| final retention |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for keep, attacks in model.attacks.items():
            d, r = attacks.adaptive["distillation"], attacks.adaptive["router_reinit"]
            lines.append(
                f"| {model.name} | {keep} | {_reached(d, 'steps_to_target')} | {d['final_retention']:.3f} | "
                f"{_reached(r, 'labels_to_target')} | {_reached(r, 'steps_to_target')} | {r['final_retention']:.3f} |"
            )
    permitted = ", ".join(settings["permitted"])
    lines += [
        "",
        f"**Authorised use**: fine-tune of the permitted groups ({permitted}) only, {settings['authorised_steps']} steps "
        f"at lr {settings['authorised_lr']:g}, on a task no model was trained on (`{models[0].authorised.get('task', '')}`), "
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
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for model in evaluation.models:
        axis.plot(keeps, [model.best_knowledge[str(k)] for k in keeps], marker="o", label=model.name)
    axis.axhline(evaluation.settings["attack"]["target_retention"], color="0.5", linewidth=0.8, linestyle=":")
    axis.invert_xaxis()
    axis.set_xlabel("experts kept per layer")
    axis.set_ylabel("target accuracy retained")
    axis.set_title(f"knowledge loss on {evaluation.settings['target_task']} (attacker's best criterion)")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def attack_cost_figure(evaluation: DefenseEvaluation, path: Path) -> Path:
    """Worst-case and mean attack cost per model, in labels and steps, one row per attack keep count."""
    plt = pyplot()
    keeps = [str(k) for k in evaluation.settings["attack_keeps"]]
    figure, axes = plt.subplots(len(keeps), 2, figsize=(10, 3.6 * len(keeps)), squeeze=False)
    names = [m.name for m in evaluation.models]
    xs = list(range(len(names)))
    for row, keep in zip(axes, keeps):
        for axis, unit in zip(row, ("labels", "steps")):
            costs = [getattr(m.attacks[keep], unit) for m in evaluation.models]
            axis.bar([x - 0.2 for x in xs], [c.best_cost for c in costs], width=0.4, label="worst case (best attack)",
                     color="tab:red")
            axis.bar([x + 0.2 for x in xs], [c.mean_cost for c in costs], width=0.4, label="mean over the grid",
                     color="tab:blue")
            for x, cost in zip(xs, costs):
                if cost.censored:
                    axis.annotate(">=", (x - 0.2, cost.best_cost), ha="center", va="bottom", fontsize=8)
            axis.set_xticks(xs, names, rotation=15)
            axis.set_ylabel(f"{unit} to {evaluation.settings['attack']['target_retention']:.0%} retention")
            axis.set_title(f"keep {keep}: attack cost in {unit}")
        row[0].legend(fontsize=8)
    return save_figure(figure, path)


def recovery_curves_figure(evaluation: DefenseEvaluation, keep: str, path: Path) -> Path | None:
    """Recovery curves of each model's best attack configuration at ``keep`` (mean and range over seeds)."""
    curves = {}
    for model in evaluation.models:
        attacks = model.attacks[keep]
        if attacks.best_runs:
            curves[f"{model.name} ({configuration_label(attacks.labels.best)})"] = attacks.best_runs
    if not curves:
        return None
    return recovery_figure(curves, path, title=f"keep {keep}: recovery under the attacker's best configuration")


def write_report(evaluation: DefenseEvaluation, out: Path) -> None:
    """Write the figures, then ``defense_eval.json`` and ``defense_eval.md``, into ``out``."""
    out = Path(out)
    figures = out / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    paths = {
        "utility": utility_figure(evaluation, figures / "utility.png"),
        "knowledge_loss": knowledge_figure(evaluation, figures / "knowledge_loss.png"),
        "attack_cost": attack_cost_figure(evaluation, figures / "attack_cost.png"),
    }
    for keep in map(str, evaluation.settings["attack_keeps"]):
        paths[f"recovery_keep{keep}"] = recovery_curves_figure(evaluation, keep, figures / f"recovery_keep{keep}.png")
    evaluation.figures = {name: str(p) for name, p in paths.items() if p is not None}
    write_json(out / RESULT_NAME, evaluation.to_dict())
    atomic_write_text(out / TABLE_NAME, markdown_tables(evaluation))
