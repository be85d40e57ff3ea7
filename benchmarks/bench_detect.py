"""Benchmark: the detection evasion suite - `moeguard detect` against every disguise an attacker has.

Parents: the default demo model (`DemoConfig()`, seed 0) and the small reference configuration of the
shared reference models (2 layers, hidden 64, tasks upper/caesar/sort/reverse, 1000 steps; seed 0).
Every derivative is a carve (random kept experts per layer, shuffled) then:

  exact       each function-preserving evasion of `moeguard.forensics.derivatives.EVASIONS` alone, and all of
              them composed (`composed`); the output difference to the carve is measured (float64 forward);
  approximate shrinking the residual stream, int8/int4 round-to-nearest weights, bfloat16/float16, a dropped
              layer, a re-initialised router;
  router      router re-initialised then retrained: router only, or every parameter (400 steps);
  merge       every removed expert averaged into a kept one with weight w (0.2, 0.35, 0.5), keep 4 (one partner
              per kept expert) and keep 2 (three), then disguised; partners are scored against `mixes`;
  realign     full fine-tuning on the target task (160 steps at lr 1e-4..3e-3, keep 2/4/non-uniform), then the
              composed disguise;
  long        full fine-tuning of a keep-2 carve for up to --long-steps steps (10x the earlier stress run) at
              --long-lrs, checkpoints scored (disguised) with the attacker's target-task accuracy;
  siblings    two fine-tunes of the parent on different tasks: uncarved sibling vs sibling, and a carve of one
              ranked against both and the parent (`rank_parents`).

Negatives: the shared independent reference models - small set seeds 101..140 and the variety set 201..210
against the small parent, `DemoConfig()` seeds 1 and 2 against the default parent - each as is, pruned to 4
and to 2 shuffled experts, disguised (composed evasions) and cast to bfloat16. The false-positive rate is
reported at the verdict's alpha for the built-in null and for a leave-one-out reference calibration (each
small-set model calibrated on the other 39).

Timing: `detect()` end to end on the default parent against the detector as it was before this suite
(`--baseline-commit`, loaded from git), interleaved, in this run.

Every group is cached under $MOEGUARD_CACHE/bench_detect/<key>; the key covers the parents, the settings and
the detector's source, so a rerun resumes and a changed detector starts afresh. Writes results.json and
figures to --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import moeguard.forensics
from moeguard.data import batches, load_task
from moeguard.eval import evaluate
from moeguard.forensics import DEFAULT_ALPHA, Detector, NullCalibration, detect, rank_parents
from moeguard.forensics.calibration import MIN_REFERENCES
from moeguard.forensics.derivatives import COMPOSED, EVASIONS, carve, evade, output_difference, random_orders
from moeguard.forensics.views import ModelView
from moeguard.io import read_json, write_json
from moeguard.models import MoEModel, load_moe
from moeguard.training import train
from moeguard.zoo import DemoConfig, cache_root, demo_model_path

SMALL = DemoConfig(layers=2, hidden=64, expert_hidden=64, tasks=("upper", "caesar", "sort", "reverse"), task_weights=(), steps=1000)
VARIETY = dataclasses.replace(SMALL, tasks=("addition", "count", "upper", "reverse"))
PARENTS = {"default": DemoConfig(), "small": SMALL}
NEGATIVES = {"default": [(DemoConfig(), s) for s in (1, 2)],
             "small": [(SMALL, s) for s in range(101, 141)] + [(VARIETY, s) for s in range(201, 211)]}
EXACT = [name for name, e in EVASIONS.items() if e.exact] + ["composed"]
APPROXIMATE = [name for name, e in EVASIONS.items() if not e.exact]
KEEPS = {"2": [2], "4": [4], "6": [6]}
MERGE_WEIGHTS = (0.2, 0.35, 0.5)
REALIGN_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
SIBLING_TASKS = ("addition", "count")
CACHE_VERSION = 2


def per_layer(keep: list[int], num_layers: int) -> list[int]:
    return [keep[layer % len(keep)] for layer in range(num_layers)]


def stable_seed(name: str) -> int:
    """A seed fixed by a group's name, so adding a group leaves every other group's draws unchanged."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def composed(moe: MoEModel) -> list[str]:
    """Every exact evasion that applies to ``moe``, in the table's composition order plus the vocabulary ones."""
    names = [*COMPOSED, "reorder vocabulary", "extend vocabulary"]
    return [n for n in names if EVASIONS[n].unsupported(moe) is None]


def disguise(moe: MoEModel, seed: int) -> MoEModel:
    return evade(moe, composed(moe), seed=seed)


def fine_tune(moe: MoEModel, task: str, *, steps: int, lr: float, seed: int, batch_size: int, parameters=None) -> float:
    data = load_task(task, "train", limit=min(steps * batch_size, 20_000), seed=seed)
    result = train(moe, batches(moe.tokenizer, data, batch_size=batch_size, shuffle=True, seed=seed, epochs=None),
                   steps=steps, lr=lr, parameters=parameters, seed=seed, progress=False)
    return result.final_loss


def accuracy(moe: MoEModel, task: str) -> float:
    return float(evaluate(moe, None, load_task(task, "test", limit=200), batch_size=100).value)


def score(detector: Detector, suspect: MoEModel, truth: list[list[int]] | None, **extra) -> dict:
    """One comparison as a row: verdict, kept-set recovery against ``truth`` (parent experts in suspect order)."""
    verdict = detector.verdict(detector.compare(ModelView(suspect)))
    row = dict(extra, z=verdict.z, statistic=verdict.statistic, status=verdict.status, relation=verdict.relation,
               closeness=verdict.closeness, alignment_residual=verdict.alignment.get("residual"), seconds=verdict.seconds)
    if truth is not None:
        row["truth"] = truth
        row["order"] = [lv.order for lv in verdict.layers]
        row["order_exact"] = [lv.order == t for lv, t in zip(verdict.layers, truth)]
        row["kept_exact"] = [lv.kept == sorted(t) for lv, t in zip(verdict.layers, truth)]
        row["mixes"] = [[[int(j) for j, _ in m.mixes] for m in lv.matches] for lv in verdict.layers]
        matched = [m for lv in verdict.layers for m in lv.matches if m.parent_expert is not None]
        row["min_similarity"] = min((m.similarity for m in matched), default=None)
        row["min_neuron_similarity"] = min((m.weight_similarity for m in matched), default=None)
    return row


def detector_source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(moeguard.forensics.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


class Groups:
    """Cached groups of rows: each built once (and timed), then read back."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.costs: list[dict] = []

    def get(self, name: str, build: Callable[[], list[dict]]) -> list[dict]:
        path = self.directory / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            group = read_json(path, what="cached benchmark group")
            print(f"  {name}: {len(group['rows'])} rows (cached)", flush=True)
        else:
            wall, cpu = time.perf_counter(), time.process_time()
            group = {"group": name, "rows": build()}
            group.update(wall_seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu)
            write_json(path, group)
            print(f"  {name}: {len(group['rows'])} rows in {group['wall_seconds']:.0f} s", flush=True)
        self.costs.append({"group": name, "wall_seconds": group.get("wall_seconds"), "cpu_seconds": group.get("cpu_seconds")})
        return group["rows"]


def carves(parent: MoEModel, name: str, keeps: dict[str, list[int]], seeds: int):
    """(keep name, seed, carve, truth) for every keep and seed; experts shuffled."""
    for (keep_name, keep), index in ((k, i) for k in keeps.items() for i in range(seeds)):
        seed = stable_seed(f"{name}|{keep_name}|{index}")
        orders = random_orders(parent, per_layer(keep, parent.num_layers), seed=seed)
        yield keep_name, seed, carve(parent, orders).model, orders


def suite(parent_name: str, parent: MoEModel, groups: Groups, args: argparse.Namespace) -> list[dict]:
    detector = Detector(ModelView(parent), progress=False)
    task = args.task
    rows: list[dict] = []

    for name in EXACT + APPROXIMATE:
        def build(name=name) -> list[dict]:
            out = []
            for keep_name, seed, original, truth in carves(parent, f"{parent_name}|{name}", KEEPS, args.carves):
                applicable = composed(original) if name == "composed" else [name]
                if name != "composed" and EVASIONS[name].unsupported(original):
                    return [{"kind": "exact" if name in EXACT else "approximate", "class": name, "skipped": EVASIONS[name].unsupported(original)}]
                suspect = evade(original, applicable, seed=seed)
                out.append(score(detector, suspect, suspect.expert_ids, kind="exact" if name in EXACT else "approximate",
                                 **{"class": name}, keep=keep_name, evasions=applicable, output_difference=output_difference(original, suspect)))
            return out

        rows += groups.get(f"{parent_name} | {name}", build)

    def realign_group(keep_name: str, keep: list[int], lr: float):
        def build() -> list[dict]:
            seed = stable_seed(f"{parent_name}|realign|{keep_name}|{lr}")
            orders = random_orders(parent, per_layer(keep, parent.num_layers), seed=seed)
            suspect = carve(parent, orders).model
            loss = fine_tune(suspect, task, steps=args.steps, lr=lr, seed=seed, batch_size=args.batch_size)
            acc = accuracy(suspect, task)
            disguised = disguise(suspect, seed)
            return [score(detector, disguised, disguised.expert_ids, kind="realign", **{"class": f"full fine-tune lr {lr:g}"},
                          keep=keep_name, steps=args.steps, lr=lr, final_loss=loss, target_accuracy=acc)]
        return build

    for keep_name, keep in {"2": [2], "4": [4], "6-4-2-3": [6, 4, 2, 3]}.items():
        for lr in REALIGN_LRS:
            rows += groups.get(f"{parent_name} | realign keep {keep_name} lr {lr:g}", realign_group(keep_name, keep, lr))
    return rows


def default_only(parent: MoEModel, groups: Groups, args: argparse.Namespace) -> list[dict]:
    """Merges, router re-initialisation with retraining, long fine-tunes and siblings (default parent)."""
    detector = Detector(ModelView(parent), progress=False)
    task = args.task
    rows: list[dict] = []
    for keep in (4, 2):
        for weight in MERGE_WEIGHTS:
            def build(keep=keep, weight=weight) -> list[dict]:
                out = []
                for index in range(args.carves):
                    seed = stable_seed(f"merge|{keep}|{weight}|{index}")
                    merged = carve(parent, random_orders(parent, [keep] * parent.num_layers, seed=seed), merge_weight=weight, seed=seed)
                    suspect = disguise(merged.model, seed)
                    row = score(detector, suspect, suspect.expert_ids, kind="merge", **{"class": f"merge w={weight:g}"}, keep=str(keep),
                                partners=[{str(k): v for k, v in m.items()} for m in merged.merged])
                    out.append(row)
                return out

            rows += groups.get(f"default | merge keep {keep} w {weight:g}", build)

    for scope in ("router", "all"):
        def build(scope=scope) -> list[dict]:
            out = []
            for keep in (2, 4):
                seed = stable_seed(f"router|{scope}|{keep}")
                orders = random_orders(parent, [keep] * parent.num_layers, seed=seed)
                suspect = evade(carve(parent, orders).model, ["re-initialise router"], seed=seed)
                routers = [p for layer in suspect.layers for p in layer.router_parameters()] if scope == "router" else None
                loss = fine_tune(suspect, task, steps=args.router_steps, lr=3e-3 if scope == "router" else 1e-3, seed=seed,
                                 batch_size=args.batch_size, parameters=routers)
                disguised = disguise(suspect, seed)
                out.append(score(detector, disguised, disguised.expert_ids, kind="router", **{"class": f"router re-init + retrain ({scope})"},
                                 keep=str(keep), steps=args.router_steps, final_loss=loss, target_accuracy=accuracy(suspect, task)))
            return out

        rows += groups.get(f"default | router re-init retrain {scope}", build)

    for lr in args.long_lrs:
        def build(lr=lr) -> list[dict]:
            seed = stable_seed(f"long|{lr}")
            orders = random_orders(parent, [2] * parent.num_layers, seed=seed)
            suspect = carve(parent, orders).model
            out, done = [], 0
            for checkpoint in [s for s in args.long_checkpoints if s <= args.long_steps]:
                loss = fine_tune(suspect, task, steps=checkpoint - done, lr=lr, seed=seed + checkpoint, batch_size=args.batch_size)
                done = checkpoint
                disguised = disguise(suspect, seed)
                out.append(score(detector, disguised, disguised.expert_ids, kind="long", **{"class": f"long fine-tune lr {lr:g}"},
                                 keep="2", steps=checkpoint, lr=lr, final_loss=loss, target_accuracy=accuracy(suspect, task)))
                print(f"    lr {lr:g} step {checkpoint}: z {out[-1]['z']:.1f}, {out[-1]['status']}, "
                      f"accuracy {out[-1]['target_accuracy']:.3f}", flush=True)
            return out

        rows += groups.get(f"default | long fine-tune lr {lr:g} to {args.long_steps}", build)

    def siblings() -> list[dict]:
        a, b = copy.deepcopy(parent), copy.deepcopy(parent)
        for model, sibling_task in zip((a, b), SIBLING_TASKS):
            fine_tune(model, sibling_task, steps=args.sibling_steps, lr=1e-3, seed=stable_seed(sibling_task), batch_size=args.batch_size)
        seed = stable_seed("siblings")
        orders = random_orders(b, [2] * b.num_layers, seed=seed)
        carved_b = disguise(carve(b, orders).model, seed)
        out = []
        uncarved = detect(a, b, progress=False)
        out.append(dict(kind="siblings", comparison=f"sibling ({SIBLING_TASKS[1]}) vs sibling ({SIBLING_TASKS[0]})", z=uncarved.z,
                        status=uncarved.status, relation=uncarved.relation, closeness=uncarved.closeness))
        for label, candidates in (("carve of sibling B vs [A, B, parent]", [a, b, parent]), ("carve of sibling B vs [A, parent]", [a, parent])):
            ranking = rank_parents(candidates, carved_b, progress=False)
            names = ["sibling A", "sibling B", "parent"] if len(candidates) == 3 else ["sibling A", "parent"]
            out.append(dict(kind="siblings", comparison=label, ranking=[names[i] for i in ranking.ranking],
                            verdicts=[dict(candidate=names[i], z=v.z, status=v.status, relation=v.relation, closeness=v.closeness,
                                           order_exact=[lv.order == t for lv, t in zip(v.layers, carved_b.expert_ids)])
                                      for i, v in enumerate(ranking.verdicts)]))
        return out

    rows += groups.get(f"default | siblings {args.sibling_steps}", siblings)
    return rows


def negatives(parent_name: str, parent: MoEModel, groups: Groups, limit: int | None) -> list[dict]:
    detector = Detector(ModelView(parent), progress=False)
    rows = []
    for config, seed in NEGATIVES[parent_name][:limit]:
        set_name = "variety" if config == VARIETY else ("small" if config == SMALL else "default shape")

        def build(config=config, seed=seed, set_name=set_name) -> list[dict]:
            model = load_moe(demo_model_path(config, seed=seed, progress=False))
            variants = {"as is": model,
                        "keep 4": carve(model, random_orders(model, [4] * model.num_layers, seed=seed)).model,
                        "keep 2": carve(model, random_orders(model, [2] * model.num_layers, seed=seed)).model,
                        "disguised": disguise(model, seed),
                        "bfloat16": evade(model, ["bfloat16"])}
            return [score(detector, suspect, None, kind="negative", set=set_name, model_seed=seed, variant=variant)
                    for variant, suspect in variants.items()]

        rows += groups.get(f"{parent_name} | negative {config.key(seed)}", build)
    return rows


def leave_one_out(rows: list[dict], alpha: float) -> dict:
    """Each small-set model's comparisons calibrated on the other models' ``as is`` statistics."""
    small = [r for r in rows if r["kind"] == "negative" and r["set"] == "small"]
    references = {r["model_seed"]: r["statistic"] for r in small if r["variant"] == "as is"}
    if len(references) <= MIN_REFERENCES:
        return {"references": len(references), "skipped": "too few small-set models for a leave-one-out calibration"}
    flagged, total, zs = 0, 0, []
    for row in small:
        calibration = NullCalibration("reference", [t for s, t in references.items() if s != row["model_seed"]])
        zs.append(calibration.z(row["statistic"]))
        flagged += calibration.p_value(row["statistic"]) <= alpha
        total += 1
    full = NullCalibration("reference", list(references.values()))
    return {"references": len(references), "comparisons": total, "false_positives": flagged,
            "z_threshold": full.z_threshold(alpha), "max_z": max(zs), "reference_mean": full.mean, "reference_std": full.std}


def baseline_detect(commit: str):
    """``detect`` of the forensics package at ``commit``, imported from git under another name."""
    root = Path(tempfile.mkdtemp(prefix="bench_detect_baseline_"))
    package = root / "forensics_before"
    package.mkdir()
    files = subprocess.run(["git", "ls-tree", "--name-only", commit, "src/moeguard/forensics/"], capture_output=True, text=True, check=True).stdout.split()
    for file in files:
        source = subprocess.run(["git", "show", f"{commit}:{file}"], capture_output=True, text=True, check=True).stdout
        (package / Path(file).name).write_text(source.replace("moeguard.forensics.", "forensics_before."))
    sys.path.insert(0, str(root))
    return importlib.import_module("forensics_before.detect").detect


def timing(parent: MoEModel, args: argparse.Namespace) -> dict:
    """Seconds per ``detect()`` comparison, this detector vs the baseline commit's, interleaved on the same suspects."""
    before = baseline_detect(args.baseline_commit)
    suspects = [c for _, _, c, _ in carves(parent, "timing", KEEPS, 2)]
    now, then = [], []
    for suspect in suspects * args.timing_repeats:
        start = time.perf_counter()
        detect(parent, suspect, progress=False)
        now.append(time.perf_counter() - start)
        start = time.perf_counter()
        before(parent, suspect, progress=False)
        then.append(time.perf_counter() - start)
    return {"comparisons": len(now), "median_seconds": statistics.median(now), "baseline_median_seconds": statistics.median(then),
            "ratio_to_baseline": statistics.median(now) / statistics.median(then), "baseline_commit": args.baseline_commit,
            "max_seconds": max(now)}


def share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def class_table(rows: list[dict]) -> list[dict]:
    table = []
    for name in dict.fromkeys((r["parent"], r["class"]) for r in rows if "class" in r and "skipped" not in r):
        members = [r for r in rows if (r.get("parent"), r.get("class")) == name and "skipped" not in r]
        layers_kept = [ok for r in members for ok in r.get("kept_exact", [])]
        layers_order = [ok for r in members for ok in r.get("order_exact", [])]
        table.append({
            "parent": name[0], "class": name[1], "kind": members[0]["kind"], "n": len(members),
            "detected": sum(r["status"] == "derived" for r in members),
            "kept_set_exact": share(layers_kept), "order_exact": share(layers_order), "layers": len(layers_kept),
            "min_z": min(r["z"] for r in members),
            "max_output_difference": max((r["output_difference"] for r in members if "output_difference" in r), default=None),
            "min_target_accuracy": min((r["target_accuracy"] for r in members if "target_accuracy" in r), default=None),
        })
    return table


def merge_scores(rows: list[dict]) -> list[dict]:
    """Per merge setting: partners found (recall) and partners claimed that are real (precision)."""
    out = []
    for setting in dict.fromkeys((r["keep"], r["class"]) for r in rows if r["kind"] == "merge"):
        found = claimed = real = 0
        for row in (r for r in rows if r["kind"] == "merge" and (r["keep"], r["class"]) == setting):
            for layer, partners in enumerate(row["partners"]):
                for position, kept in enumerate(row["truth"][layer]):
                    truth = set(partners.get(str(kept), []))
                    listed = set(row["mixes"][layer][position]) - {kept}
                    found += len(truth & listed)
                    claimed += len(listed)
                    real += len(truth)
        out.append({"keep": setting[0], "class": setting[1], "partner_recall": found / real if real else None,
                    "partner_precision": found / claimed if claimed else None})
    return out


def figures(rows: list[dict], threshold: float, out: Path) -> None:
    from moeguard.plotting import pyplot, save_figure

    plt = pyplot()
    groups: dict[str, list[float]] = {}
    for row in rows:
        if row["kind"] == "negative":
            groups.setdefault(f"independent ({row['parent']} parent, {row['set']}): {row['variant']}", []).append(row["z"])
        elif "class" in row and "skipped" not in row and row["kind"] != "long":
            groups.setdefault(f"{row['class']} ({row['parent']})", []).append(row["z"])
    labels = sorted(groups, key=lambda label: (label.startswith("independent"), label))
    figure, axes = plt.subplots(figsize=(8.5, 0.28 * len(labels) + 1.6), layout="constrained")
    for y, label in enumerate(labels):
        values = groups[label]
        jitter = torch.linspace(-0.25, 0.25, len(values)).tolist() if len(values) > 1 else [0.0]
        axes.scatter(values, [y + j for j in jitter], s=8, alpha=0.6, color="tab:red" if label.startswith("independent") else "tab:blue")
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_xscale("symlog", linthresh=5)
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1)
    axes.set_xlabel("detection score z (symlog); dashed: threshold at alpha 1e-6")
    axes.set_title("moeguard detect: disguised derivatives (blue) vs independent models (red)")
    save_figure(figure, out / "detect_scores.png")

    long_rows = [r for r in rows if r["kind"] == "long"]
    if long_rows:
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, layout="constrained")
        for lr in sorted({r["lr"] for r in long_rows}):
            series = sorted((r for r in long_rows if r["lr"] == lr), key=lambda r: r["steps"])
            top.plot([r["steps"] for r in series], [max(r["z"], 0.1) for r in series], marker="o", label=f"lr {lr:g}")
            bottom.plot([r["steps"] for r in series], [r["target_accuracy"] for r in series], marker="o", label=f"lr {lr:g}")
        top.axhline(threshold, color="black", linestyle="--", linewidth=1)
        top.set_yscale("log")
        top.set_ylabel("detection score z")
        top.legend(fontsize=8)
        bottom.set_ylabel("attacker's target-task accuracy")
        bottom.set_xlabel("full fine-tuning steps after carving (keep 2 of 8)")
        bottom.set_xscale("log")
        top.set_title("Where long fine-tuning defeats detection (default demo model)")
        save_figure(figure, out / "detect_long_finetune.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parents", default="default,small", help="which parents to run the suite on")
    parser.add_argument("--task", default="reverse", help="target task of every fine-tune")
    parser.add_argument("--steps", type=int, default=160, help="re-alignment steps (moeguard realign: 4 rounds x 40)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--carves", type=int, default=2, help="carves per keep count and class")
    parser.add_argument("--router-steps", type=int, default=400)
    parser.add_argument("--long-steps", type=int, default=12800, help="longest fine-tune (the earlier stress run had 1280)")
    parser.add_argument("--long-checkpoints", default="160,400,1000,1280,1600,2500,6400,12800,25600")
    parser.add_argument("--long-lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--sibling-steps", type=int, default=1000)
    parser.add_argument("--baseline-commit", default="93265a0", help="the detector to time against (git commit)")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--max-negatives", type=int, default=None, help="use only the first N independent models per parent")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/detect")
    args = parser.parse_args()
    args.long_checkpoints = [int(s) for s in args.long_checkpoints.split(",")]
    args.long_lrs = [float(s) for s in args.long_lrs.split(",")]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out)

    parents = {name: load_moe(demo_model_path(PARENTS[name], seed=0, progress=False)) for name in args.parents.split(",")}
    settings = {"parents": {n: p.fingerprint() for n, p in parents.items()}, "detector": detector_source_hash(),
                "version": CACHE_VERSION, **{k: v for k, v in vars(args).items() if k not in ("out", "threads", "timing_repeats", "max_negatives")}}
    cache = cache_root() / "bench_detect" / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    print(f"cache: {cache}", flush=True)
    groups = Groups(cache)
    rows: list[dict] = []
    for name, parent in parents.items():
        print(f"parent {name}: {parent.source}", flush=True)
        rows += [dict(r, parent=name) for r in negatives(name, parent, groups, args.max_negatives)]
        rows += [dict(r, parent=name) for r in suite(name, parent, groups, args)]
        if name == "default":
            rows += [dict(r, parent=name) for r in default_only(parent, groups, args)]

    z_threshold = moeguard.forensics.BUILTIN_NULL.z_threshold(DEFAULT_ALPHA)
    negative_rows = [r for r in rows if r["kind"] == "negative"]
    summary = {
        "alpha": DEFAULT_ALPHA,
        "z_threshold": z_threshold,
        "classes": class_table(rows),
        "merges": merge_scores(rows),
        "negatives": {
            "models": len({(r["parent"], r["set"], r["model_seed"]) for r in negative_rows}),
            "comparisons": len(negative_rows),
            "false_positives": sum(r["status"] == "derived" for r in negative_rows),
            "max_z": max((r["z"] for r in negative_rows), default=None),
            "by_set": {
                f"{p} / {s}": {"comparisons": len(sel), "false_positives": sum(r["status"] == "derived" for r in sel),
                               "mean_z": statistics.mean(r["z"] for r in sel), "sd_z": statistics.stdev(r["z"] for r in sel) if len(sel) > 1 else None,
                               "max_z": max(r["z"] for r in sel)}
                for p, s in dict.fromkeys((r["parent"], r["set"]) for r in negative_rows)
                for sel in [[r for r in negative_rows if (r["parent"], r["set"]) == (p, s)]]
            },
        },
        "long": [{k: r[k] for k in ("lr", "steps", "z", "status", "kept_exact", "order_exact", "target_accuracy", "final_loss",
                                    "min_similarity", "min_neuron_similarity", "alignment_residual")}
                 for r in rows if r["kind"] == "long"],
        "siblings": [r for r in rows if r["kind"] == "siblings"],
    }
    if "small" in parents:
        summary["leave_one_out_calibration"] = leave_one_out(rows, DEFAULT_ALPHA)
    if "default" in parents:
        summary["timing"] = timing(parents["default"], args)
    summary["build_cost"] = {"groups": len(groups.costs), "wall_seconds": sum(c["wall_seconds"] or 0 for c in groups.costs)}
    summary["wall_seconds_this_run"] = time.perf_counter() - started
    summary["settings"] = vars(args) | {"cache": str(cache)}
    write_json(out / "results.json", {"summary": summary, "rows": rows})
    figures(rows, z_threshold, out)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("settings", "long", "siblings")}, indent=1, default=str))


if __name__ == "__main__":
    main()
