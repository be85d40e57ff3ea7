"""Benchmark: does the expert watermark survive carving, and does it ever fire on a model made without the key?

On the default demo model (``moeguard zoo path``):

1. embed: ``harden --method watermark`` (all six tasks), and a control fine-tuned
   with the same data and budget but no watermark term;
2. utility: exact match of the original, the control and the watermarked model on
   ``--utility-examples`` test prompts per task;
3. verification of the watermarked model, locally and through the OpenAI-compatible
   server (``moeguard.watermark.server``), with the wall time of each;
4. carving: every task's experts attributed on the watermarked model by frequency,
   REAP and ablation, and a greedy subset search (backward elimination of the expert
   whose removal raises the task loss least, on the full model's answers), masked to
   each keep count; the attacker's carve is the selection with the best task accuracy;
5. re-alignment of the attacker's carve (``--realign-keeps``) on the full model's
   answers: active learning (``--acquisition``, BADGE by default), ``--train all``,
   every learning rate of ``--lrs``, verified after every round;
6. a long fine-tune of each task's keep-2 carve on the full model's answers, and of
   the full model on all tasks' correct answers;
7. distillation: a fresh student with the keep-2 carve's architecture, trained on the
   watermarked model's answers to ordinary task inputs;
8. false positives: the key (and ``--fpr-keys`` more keys) against the shared
   independent models (small set seeds 101..140, variety set 201..210, default shape
   seeds 1 and 2), the unwatermarked original and the control.

Each unit is saved under ``--out`` when it finishes (default
``$MOEGUARD_CACHE/bench_watermark/<settings hash>``); rerun the command to resume.
The summary, tables and figures go to ``benchmarks/results/watermark/``.

    python benchmarks/bench_watermark.py

A stronger re-alignment attacker plugs in through ``REALIGNERS`` (a
:data:`moeguard.watermark.robustness.Realigner`), chosen with ``--realigner``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moeguard.data import batches, load_task, mixture
from moeguard.defense.harden import HardenSettings, harden_to_directory, load_defense_tasks
from moeguard.defense.objective import defense_config
from moeguard.eval import evaluate_tasks
from moeguard.io import read_json, write_json
from moeguard.models import MoEModel, load_moe
from moeguard.realign import RealignConfig, builtin_data
from moeguard.training import lm_loss
from moeguard.watermark import Watermark, builtin_record, verify_watermark
from moeguard.watermark.statistics import bonferroni, chance_rate
from moeguard.watermark.suspects import EndpointOptions
from moeguard.watermark.triggers import generation_tasks
from moeguard.watermark.verify import task_evidence
from moeguard.watermark.robustness import (
    Realigner,
    active_learning_realigner,
    carve_keep_sets,
    distill_attack,
    finetune_attack,
    measure,
    realign_attack,
    teacher_labelled,
)
from moeguard.watermark.server import serve_model
from moeguard.zoo import TINY_DEMO, DemoConfig, cache_root, demo_model_path
from moeguard.zoo.demo import intra_op_threads

sys.path.insert(0, str(Path(__file__).parent))
from bench_defense import control_demo  # noqa: E402  (the same control as the defense benchmark)

log = logging.getLogger("bench_watermark")

SMALL = dict(layers=2, hidden=64, expert_hidden=64, task_weights=(), steps=1000)
INDEPENDENT = (
    [("small", DemoConfig(tasks=("upper", "caesar", "sort", "reverse"), **SMALL), seed) for seed in range(101, 141)]
    + [("variety", DemoConfig(tasks=("addition", "count", "upper", "reverse"), **SMALL), seed) for seed in range(201, 211)]
    + [("default", DemoConfig(), seed) for seed in (1, 2)]
)
CRITERIA = ("frequency", "reap", "ablation")
DEMOS = {"default": DemoConfig(), "tiny": TINY_DEMO}


CACHED_ONLY = False  # --cached-only: summarise the units already measured, compute nothing new


def cached(path: Path, compute: Callable[[], Any]) -> Any:
    """The JSON at ``path``, or ``compute()`` written there first (each unit of the benchmark resumes);
    None for a missing unit with ``--cached-only``."""
    if path.is_file():
        return read_json(path)
    if CACHED_ONLY:
        return None
    start = time.perf_counter()
    value = compute()
    write_json(path, value)
    log.info("%s done in %.0fs", path.relative_to(path.parents[1]), time.perf_counter() - start)
    return value


# ---------------------------------------------------------------- carving
@torch.no_grad()
def subset_search(moe: MoEModel, labelled, keeps: list[int]) -> dict[int, dict[int, list[int]]]:
    """Greedy backward elimination per keep count (largest first, each continuing from the last): drop the
    (layer, expert) whose removal raises the loss on ``labelled`` least, from layers above the count."""
    batch = next(batches(moe.tokenizer, labelled, batch_size=len(labelled)))
    kept = {layer.index: list(range(layer.num_experts)) for layer in moe.layers}
    found = {}
    for keep in sorted(keeps, reverse=True):
        while any(len(experts) > keep for experts in kept.values()):
            best = None
            for layer, experts in kept.items():
                if len(experts) <= keep:
                    continue
                for expert in experts:
                    trial = {**kept, layer: [e for e in experts if e != expert]}
                    with moe.mask_experts(trial):
                        loss = lm_loss(moe, batch).item()
                    if best is None or loss < best[0]:
                        best = (loss, layer, expert)
            kept[best[1]].remove(best[2])
        found[keep] = {layer: list(experts) for layer, experts in kept.items()}
    return found


def carve_unit(moe: MoEModel, watermark: Watermark, task: str, keeps: list[int], args) -> dict[str, Any]:
    test = load_task(task, "test", limit=args.test_examples)
    pool = load_task(task, "pool", limit=args.attribution_examples)
    searched = subset_search(moe, teacher_labelled(moe, pool.head(64)), [k for k in keeps if k < 8])
    rows = []
    for keep in keeps:
        if keep >= min(moe.num_experts):
            point = measure(moe, watermark, [test], attack="carve", steps=0, settings={"keep": keep, "selection": "none"})
            rows.append(point.to_dict() | {"keep": keep, "selection": "none", "kept": None})
            continue
        selections = carve_keep_sets(moe, pool, keep, CRITERIA) | {"search": searched[keep]}
        for selection, kept in selections.items():
            with moe.mask_experts(kept):
                point = measure(moe, watermark, [test], attack="carve", steps=0, settings={"keep": keep, "selection": selection})
            rows.append(point.to_dict() | {"keep": keep, "selection": selection, "kept": {str(k): v for k, v in kept.items()}})
    return {"task": task, "rows": rows}


def attacker_carve(carve: dict[str, Any], keep: int) -> dict[str, Any]:
    """The attacker's choice at ``keep``: the selection whose carve answers the task best."""
    return max((row for row in carve["rows"] if row["keep"] == keep), key=lambda row: row["accuracy"])


def keep_sets_of(row: dict[str, Any]) -> dict[int, list[int]]:
    return {int(layer): experts for layer, experts in row["kept"].items()}


# ---------------------------------------------------------------- false positives
def false_positive_unit(name: str, source: Path, keys: list[str], record) -> dict[str, Any]:
    """Each key's verdict on a model made without it, and per task how its answers sit in the response
    space: how many have the response's length and alphabet, and the most times one such answer repeats
    (the dependence between answers that a binomial chance model would ignore)."""
    moe = load_moe(source)
    rows = []
    for key in keys:
        watermark = Watermark(record, key)
        triggers = watermark.triggers()
        verdict = verify_watermark(moe, watermark)
        shape = {}
        for task in record.tasks:
            response = next(t.response for t in triggers if t.task == task.name)
            answers = [a for a, t in zip(verdict.answers, triggers) if t.task == task.name]
            in_space = [a for a in answers if len(a) == len(response) and all(c in task.alphabet for c in a)]
            shape[task.name] = {"in_space": len(in_space),
                                "largest_repeat": max(Counter(in_space).values(), default=0)}
        rows.append({"key": key, "matches": verdict.matches, "triggers": verdict.triggers, "p_value": verdict.p_value,
                     "detected": verdict.detected, "task_matches": {t.task: t.matches for t in verdict.tasks},
                     "spaces": {t.task: t.space for t in verdict.tasks}, "answer_shape": shape})
    return {"model": name, "source": str(source), "rows": rows}


# ---------------------------------------------------------------- judging saved measurements
def rejudge(point: dict[str, Any], spaces: dict[str, int]) -> dict[str, Any]:
    """``point`` with its p-value and detection recomputed from its match counts by the current verdict rule
    (so units measured before a change of the rule stay comparable)."""
    counts = point.get("task_matches") or ({point["tasks"][0]: point["matches"]} if len(point["tasks"]) == 1 else None)
    if counts is None:
        return point
    per_task = point["triggers"] // len(point["tasks"])
    tests = [task_evidence(task, matches, per_task, spaces[task], tests=len(counts)) for task, matches in counts.items()]
    return dict(point, p_value=bonferroni([t.p_value for t in tests]), detected=any(t.detected for t in tests))


# ---------------------------------------------------------------- the figure
def draw_figure(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (carve_ax, steps_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for task, row in summary["carve"].items():
        keeps = sorted(row, key=int, reverse=True)
        carve_ax.plot([int(k) for k in keeps], [row[k]["match_rate"] for k in keeps], marker="o", label=task)
    carve_ax.set_xlabel("experts kept per layer (attacker's carve)")
    carve_ax.set_ylabel("share of the task's triggers answered")
    carve_ax.invert_xaxis()
    carve_ax.set_ylim(-0.02, 1.02)
    carve_ax.set_title("carving")
    carve_ax.legend(fontsize=8)
    for label, curve in summary["curves"].items():
        steps = sorted(curve, key=int)
        steps_ax.plot([max(1, int(s)) for s in steps], [curve[s]["detected"] for s in steps], marker=".", label=label)
    steps_ax.set_xscale("log")
    steps_ax.set_xlabel("attack optimizer steps (0 plotted at 1)")
    steps_ax.set_ylabel("share of runs detected (>= 3 matches, p <= 1e-6)")
    steps_ax.set_ylim(-0.02, 1.02)
    steps_ax.set_title("detection vs attack strength")
    steps_ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_of(points: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per step count: the share of runs detected and the mean share of triggers answered."""
    by_steps: dict[int, list[dict[str, Any]]] = {}
    for point in points:
        by_steps.setdefault(point["steps"], []).append(point)
    return {
        str(steps): {
            "runs": len(rows),
            "detected": sum(r["detected"] for r in rows) / len(rows),
            "match_rate": sum(r["matches"] / r["triggers"] for r in rows) / len(rows),
            "accuracy": sum(r["accuracy"] for r in rows) / len(rows),
        }
        for steps, rows in sorted(by_steps.items())
    }


# ---------------------------------------------------------------- main
REALIGNERS: dict[str, Callable[[argparse.Namespace, float], Realigner]] = {
    "active-learning": lambda args, lr: active_learning_realigner(RealignConfig(
        budget=args.budget, rounds=args.rounds, acquisition=args.acquisition, scope="all", lr=lr,
        steps_per_round=args.steps_per_round, batch_size=16, seed=0)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", choices=list(DEMOS), default="default", help="the model to watermark (tiny: a smoke run)")
    parser.add_argument("--key", default="bench-watermark-key-0", help="the owner's key")
    parser.add_argument("--out", default=None, help="work directory (default: $MOEGUARD_CACHE/bench_watermark/<hash>)")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "watermark"))
    parser.add_argument("--tasks", default=None, help="tasks to watermark (default: every task of the demo model)")
    parser.add_argument("--harden-steps", type=int, default=2400)
    parser.add_argument("--harden-lr", type=float, default=1e-3)
    parser.add_argument("--strength", type=float, default=0.3, help="weight of the watermark term")
    parser.add_argument("--triggers-per-task", type=int, default=32)
    parser.add_argument("--utility-examples", type=int, default=1000)
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--attribution-examples", type=int, default=256)
    parser.add_argument("--keeps", default="8,6,4,3,2")
    parser.add_argument("--realign-keeps", default="2,4")
    parser.add_argument("--realigner", choices=list(REALIGNERS), default="active-learning")
    parser.add_argument("--acquisition", default="badge")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=40)
    parser.add_argument("--carve-finetune-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=4000)
    parser.add_argument("--finetune-lrs", default="1e-3")
    parser.add_argument("--distill-steps", type=int, default=3000)
    parser.add_argument("--distill-inputs", type=int, default=8000)
    parser.add_argument("--distill-tasks", default=None, help="tasks to distill (default: all)")
    parser.add_argument("--carve-finetune-tasks", default=None, help="tasks whose keep-2 carve is fine-tuned (default: all)")
    parser.add_argument("--cached-only", action="store_true", help="summarise the units measured so far, compute nothing new")
    parser.add_argument("--fpr-keys", type=int, default=10, help="keys besides --key tried on every independent model")
    parser.add_argument("--fpr-models", type=int, default=len(INDEPENDENT), help="how many of the independent models to use")
    parser.add_argument("--skip", default="", help="stages to skip: realign,carve_finetune,finetune,distill,fpr")
    args = parser.parse_args(argv)
    global CACHED_ONLY
    CACHED_ONLY = args.cached_only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("moeguard").setLevel(logging.INFO)
    torch.set_num_threads(1)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else generation_tasks(DEMOS[args.demo].tasks)
    keeps = [int(k) for k in args.keeps.split(",")]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    settings = HardenSettings(steps=args.harden_steps, lr=args.harden_lr)
    config = defense_config("watermark", strength=args.strength)
    identity = {"demo": args.demo, "demo_config": dataclasses.asdict(DEMOS[args.demo]), "key": args.key, "tasks": tasks, "harden": dataclasses.asdict(settings), "config": config.to_dict(),
                "triggers_per_task": args.triggers_per_task}
    out = Path(args.out) if args.out else cache_root() / "bench_watermark" / hashlib.sha256(
        json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "identity.json", identity)
    print(f"work directory {out}", flush=True)
    record = builtin_record(tasks, triggers_per_task=args.triggers_per_task)
    watermark = Watermark(record, args.key)
    demo = demo_model_path(DEMOS[args.demo])

    with intra_op_threads(1):
        # 1. the watermarked model and the control
        marked_dir = out / "models" / "watermarked"
        if not marked_dir.is_dir():
            train, test = load_defense_tasks(",".join(tasks), [], train_examples=4000, eval_examples=200)
            harden_to_directory(load_moe(demo), train, test, config, settings, out=marked_dir, permitted=["router", "attention"],
                                method="watermark", watermark=watermark)
        control_dir = control_demo(demo, out / "models" / "control", tasks, settings)
        marked = load_moe(marked_dir)

        # 2. utility
        def utility() -> dict[str, Any]:
            tests = [load_task(t, "test", limit=args.utility_examples) for t in tasks]
            return {name: {t: r.value for t, r in evaluate_tasks(load_moe(path), None, tests, batch_size=250).items()}
                    for name, path in (("original", demo), ("control", control_dir), ("watermarked", marked_dir))}

        utility_result = cached(out / "units" / "utility.json", utility)

        # 3. verification, local and over HTTP
        def verification() -> dict[str, Any]:
            local = verify_watermark(marked, watermark)
            with serve_model(marked, name="watermarked-demo") as url:
                start = time.perf_counter()
                remote = verify_watermark(url, watermark, endpoint=EndpointOptions(timeout=60))
                http_seconds = time.perf_counter() - start
            others = [verify_watermark(marked, Watermark(record, f"other-key-{n:03d}")) for n in range(args.fpr_keys)]
            return {"local": local.summary(), "http": remote.summary(), "http_seconds": http_seconds,
                    "same_answers": local.matched == remote.matched,
                    "other_keys": [{"matches": v.matches, "p_value": v.p_value, "detected": v.detected} for v in others]}

        verification_result = cached(out / "units" / "verify.json", verification)

        # 4. carving
        carves = {t: cached(out / "units" / "carve" / f"{t}.json", lambda t=t: carve_unit(marked, watermark, t, keeps, args))
                  for t in tasks}

        # 5. re-alignment of the attacker's carve
        realigned: list[dict[str, Any]] = []
        if "realign" not in skip:
            for keep in [int(k) for k in args.realign_keeps.split(",")]:
                for task in tasks:
                    choice = attacker_carve(carves[task], keep)
                    for lr in [float(x) for x in args.lrs.split(",")]:
                        def run(task=task, choice=choice, lr=lr, keep=keep):
                            data = builtin_data(task, pool_size=512, test_size=args.test_examples, other_tasks=[])
                            points = realign_attack(marked, watermark, data, keep_sets_of(choice),
                                                    REALIGNERS[args.realigner](args, lr),
                                                    settings={"keep": keep, "lr": lr, "selection": choice["selection"]})
                            return [dict(choice, steps=0, attack="realign", settings={"keep": keep, "lr": lr})] + [
                                p.to_dict() for p in points]
                        name = f"{task}-k{keep}-{args.realigner}-{args.acquisition}-lr{lr:g}.json"
                        realigned.append({"task": task, "keep": keep, "lr": lr,
                                          "points": cached(out / "units" / "realign" / name, run)})
            realigned = [r for r in realigned if r["points"] is not None]

        # 6. long fine-tunes: of each task's keep-2 carve (teacher answers) and of the full model
        carve_tuned: list[dict[str, Any]] = []
        if "carve_finetune" not in skip:
            for task in subset(args.carve_finetune_tasks, tasks):
                choice = attacker_carve(carves[task], 2)

                def run(task=task, choice=choice):
                    labelled = teacher_labelled(marked, load_task(task, "train", limit=4000, seed=7))
                    points = finetune_attack(marked, watermark, labelled, [load_task(task, "test", limit=args.test_examples)],
                                             keep=keep_sets_of(choice), steps=args.carve_finetune_steps, every=250, lr=1e-3)
                    return [p.to_dict() for p in points]

                carve_tuned.append({"task": task, "points": cached(out / "units" / "carve_finetune" / f"{task}-k2.json", run)})
            carve_tuned = [r for r in carve_tuned if r["points"] is not None]
        tuned: list[dict[str, Any]] = []
        if "finetune" not in skip:
            for lr in [float(x) for x in args.finetune_lrs.split(",")]:
                def run(lr=lr):
                    train = mixture([load_task(t, "train", limit=4000, seed=11) for t in tasks])
                    tests = [load_task(t, "test", limit=args.test_examples) for t in tasks]
                    return [p.to_dict() for p in finetune_attack(marked, watermark, train, tests, steps=args.finetune_steps,
                                                                 every=500, lr=lr)]
                tuned.append({"lr": lr, "points": cached(out / "units" / "finetune" / f"all-lr{lr:g}.json", run)})
            tuned = [r for r in tuned if r["points"] is not None]

        # 7. distillation into a fresh student of the keep-2 carve's architecture
        distilled: list[dict[str, Any]] = []
        if "distill" not in skip:
            for task in subset(args.distill_tasks, tasks):
                choice = attacker_carve(carves[task], 2)

                def run(task=task, choice=choice):
                    inputs = load_task(task, "train", limit=args.distill_inputs, seed=23)
                    points = distill_attack(marked, watermark, inputs, load_task(task, "test", limit=args.test_examples),
                                            keep_sets_of(choice), steps=args.distill_steps, every=500)
                    return [p.to_dict() for p in points]

                distilled.append({"task": task, "points": cached(out / "units" / "distill" / f"{task}-k2.json", run)})
            distilled = [r for r in distilled if r["points"] is not None]

        # 8. false positives
        fpr: list[dict[str, Any]] = []
        if "fpr" not in skip:
            keys = [args.key] + [f"fpr-key-{n:03d}" for n in range(args.fpr_keys)]
            for family, demo_config, seed in INDEPENDENT[: args.fpr_models]:
                source = demo_model_path(demo_config, seed=seed, progress=False)
                fpr.append(cached(out / "units" / "fpr" / f"{family}-{seed}.json",
                                  lambda s=source, n=f"{family}-{seed}": false_positive_unit(n, s, keys, record)))
            for name, source in (("original", demo), ("control", control_dir)):
                fpr.append(cached(out / "units" / "fpr" / f"{name}.json",
                                  lambda s=source, n=name: false_positive_unit(n, s, [args.key], record)))
            fpr = [unit for unit in fpr if unit is not None]

    spaces = {t.task: t.space for t in watermark.triggers()}
    summary = summarise(args, tasks, keeps, spaces, utility_result, verification_result, carves, realigned, carve_tuned, tuned,
                        distilled, fpr, marked_dir)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "summary.json", summary)
    draw_figure(summary, results / "detection_vs_attack.png")
    tables = markdown(summary)
    (results / "summary.md").write_text(tables)
    print(tables)
    print(f"summary and figure written to {results}")
    return 0


def subset(text: str | None, tasks: list[str]) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else tasks


def summarise(args, tasks, keeps, spaces, utility, verification, carves, realigned, carve_tuned, tuned, distilled, fpr,
              marked_dir):
    """Every number RESULTS.md reports, from the saved units (verdicts recomputed by the current rule)."""
    judge = lambda points: [rejudge(p, spaces) for p in points]  # noqa: E731
    carves = {task: dict(carve, rows=judge(carve["rows"])) for task, carve in carves.items()}
    realigned = [dict(r, points=judge(r["points"])) for r in realigned]
    carve_tuned = [dict(r, points=judge(r["points"])) for r in carve_tuned]
    tuned = [dict(r, points=judge(r["points"])) for r in tuned]
    distilled = [dict(r, points=judge(r["points"])) for r in distilled]
    for run in ("local", "http"):
        counts = {t["task"]: t["matches"] for t in verification[run]["tasks"]}
        verification[run] = rejudge({**verification[run], "tasks": list(counts), "task_matches": counts}, spaces)
    cost = {t: {"vs_original": utility["original"][t] - utility["watermarked"][t],
                "vs_control": utility["control"][t] - utility["watermarked"][t]} for t in tasks}
    carve_summary = {}
    for task in tasks:
        carve_summary[task] = {}
        for keep in keeps:
            choice = attacker_carve(carves[task], keep)
            carve_summary[task][str(keep)] = {
                "selection": choice["selection"], "accuracy": choice["accuracy"], "matches": choice["matches"],
                "triggers": choice["triggers"],
                "match_rate": choice["matches"] / choice["triggers"], "p_value": choice["p_value"],
                "detected": choice["detected"],
                "all_selections_detected": all(r["detected"] for r in carves[task]["rows"] if r["keep"] == keep),
            }
    curves = {}
    for keep in sorted({r["keep"] for r in realigned}):
        for lr in sorted({r["lr"] for r in realigned}):
            points = [p for r in realigned if r["keep"] == keep and r["lr"] == lr for p in r["points"]]
            curves[f"carve {keep} + re-align lr {lr:g}"] = curve_of(points)
    if carve_tuned:
        curves["carve 2 + fine-tune lr 1e-3"] = curve_of([p for r in carve_tuned for p in r["points"]])
    for run in tuned:
        curves[f"full fine-tune lr {run['lr']:g}"] = curve_of(run["points"])
    if distilled:
        curves["distilled fresh student (keep-2 shape)"] = curve_of([p for r in distilled for p in r["points"]])
    independent = [row for unit in fpr for row in unit["rows"]]
    p_values = [row["p_value"] for row in independent]
    triggers = sum(row["triggers"] for row in independent)
    per_task = [(task, row["triggers"] // len(row["task_matches"]), row) for row in independent for task in row["task_matches"]]
    expected = sum(n * chance_rate(spaces[task]) for task, n, _ in per_task)
    shapes = [row["answer_shape"][task] for task, _, row in per_task if "answer_shape" in row]
    return {
        "settings": vars(args),
        "model": str(marked_dir),
        "utility": utility,
        "utility_cost": cost,
        "verification": verification,
        "carve": carve_summary,
        "curves": curves,
        "realign_final": [{"task": r["task"], "keep": r["keep"], "lr": r["lr"], **{k: r["points"][-1][k] for k in
                           ("steps", "accuracy", "matches", "triggers", "p_value", "detected")}} for r in realigned],
        "distill_final": [{"task": r["task"], **{k: r["points"][-1][k] for k in
                           ("steps", "accuracy", "matches", "triggers", "p_value", "detected")}} for r in distilled],
        "fpr": {
            "models": len(fpr),
            "checks": len(independent),
            "detected": sum(row["detected"] for row in independent),
            "smallest_p_value": min(p_values) if p_values else math.nan,
            "matches": sum(row["matches"] for row in independent),
            "triggers": triggers,
            "models_with_a_match": sorted({unit["model"] for unit in fpr if any(r["matches"] for r in unit["rows"])}),
            "expected_matches": expected,
            "task_tests": len(per_task),
            "task_tests_reaching_min_matches": sum(row["task_matches"][task] >= 3 for task, _, row in per_task),
            "answers_in_response_space": sum(s["in_space"] for s in shapes),
            "answers_checked_for_shape": sum(n for _, n, row in per_task if "answer_shape" in row),
            "largest_repeat_in_space": max((s["largest_repeat"] for s in shapes), default=0),
        },
    }


def markdown(summary: dict[str, Any]) -> str:
    """The tables of RESULTS.md."""
    utility, cost = summary["utility"], summary["utility_cost"]
    lines = ["| task | original | control | watermarked | points lost vs original | points lost vs control |",
             "|---|---|---|---|---|---|"]
    for task, row in cost.items():
        lines.append(f"| {task} | {utility['original'][task]:.3f} | {utility['control'][task]:.3f} | "
                     f"{utility['watermarked'][task]:.3f} | {100 * row['vs_original']:+.1f} | {100 * row['vs_control']:+.1f} |")
    keeps = sorted({int(k) for row in summary["carve"].values() for k in row}, reverse=True)
    lines += ["", "| task | " + " | ".join(f"keep {k}" for k in keeps) + " |", "|---|" + "---|" * len(keeps)]
    for task, row in summary["carve"].items():
        cells = []
        for keep in keeps:
            c = row[str(keep)]
            cells.append(f"{c['matches']}/{c['triggers']} p={c['p_value']:.0e} acc {c['accuracy']:.2f} ({c['selection']})"
                         + ("" if c["all_selections_detected"] else " *"))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "| attack | steps | runs | detected | triggers answered | task accuracy |", "|---|---|---|---|---|---|"]
    for label, curve in summary["curves"].items():
        for steps, point in curve.items():
            lines.append(f"| {label} | {steps} | {point['runs']} | {point['detected']:.2f} | {point['match_rate']:.2f} | "
                         f"{point['accuracy']:.3f} |")
    fpr = summary["fpr"]
    lines += ["", f"false positives: {fpr['detected']} of {fpr['checks']} checks on {fpr['models']} models "
              f"({fpr['matches']} matching answers of {fpr['triggers']} trigger prompts, {fpr['expected_matches']:.2g} "
              f"expected by chance); smallest p = {fpr['smallest_p_value']:.3g}; {fpr['answers_in_response_space']} of "
              f"{fpr['answers_checked_for_shape']} answers had the response's length and alphabet, the most one such "
              f"answer repeated within a task's triggers: {fpr['largest_repeat_in_space']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
