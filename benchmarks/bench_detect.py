"""Benchmark: detecting pruned, re-aligned, re-ordered and cast derivatives of the demo model.

Positives: derivatives of the demo model, every combination of
  prune      keep 8 (none), 6, 4, 2 of 8 experts per layer, and a non-uniform 6, 4, 2, 3 per layer
             (cycled over the layers; random kept sets; the non-uniform one lives in memory, as it
             would in a custom checkpoint);
  re-align   none; full fine-tuning of every parameter at lr 1e-4, 3e-4, 1e-3, 3e-3 (the re-alignment
             attacker's grid; 3e-4 is `moeguard realign`'s default); fine-tuning of the
             non-expert parameters only (attention, embeddings, norms) at 1e-3 - each run is
             `--steps` AdamW steps of batch `--batch-size` on the target task's training split,
             with moeguard.training.train (the loop `moeguard realign` uses);
  permute    kept experts in ascending order, or shuffled (router rows moved with them);
  cast       float32, bfloat16, float16.
Negatives: demo-architecture models trained from other seeds (`--independent` of them, `--independent-steps`
steps each: short but real training runs of the demo recipe, cached in the demo model cache; with
`--full-independent N` also N trained with the parent's full recipe), and demo-size models of other
families (unrelated MoEs), each compared as is, pruned to 4 shuffled experts, and cast to bfloat16.
With `--stress`, heavier re-alignments than the attacker's grid (STRESS) of a keep-2 derivative are run
too and reported apart from the headline figures.

Reports AUROC of the score z (derived = positive), decisions at the stated threshold, the share of
(derivative, layer) pairs whose kept set and expert order are recovered exactly, and the time per
comparison (median; also as a ratio to one forward pass of the parent on a 16 x 64 batch, measured right
before each comparison, so that both see the same load on a shared machine). Writes results.json and a figure of the scores to --out.

Every group of comparisons (one re-aligned derivative in its six permute x cast variants, or one negative
model in its three variants) is cached under $MOEGUARD_CACHE/bench_detect/<key> as soon as it is done; the
key covers the parent, the settings and the detector's source, so a rerun resumes and a changed detector
starts afresh.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import moeguard.forensics
from moeguard.data import batches, load_task
from moeguard.forensics import DEFAULT_ALPHA, detect
from moeguard.forensics.derivatives import random_orders, reindex_experts
from moeguard.forensics.matching import z_threshold
from moeguard.io import read_json, write_json
from moeguard.models import MoEModel, load_moe
from moeguard.training import train
from moeguard.zoo import TINY_DEMO, DemoConfig, cache_root, demo_model_path

KEEPS = {"8": [8], "6": [6], "4": [4], "2": [2], "6-4-2-3": [6, 4, 2, 3]}
REALIGN = {
    "none": None,
    "full 1e-4": ("all", 1e-4),
    "full 3e-4": ("all", 3e-4),
    "full 1e-3": ("all", 1e-3),
    "full 3e-3": ("all", 3e-3),
    "non-expert 1e-3": ("non-expert", 1e-3),
}
# With --stress: heavier re-alignment than the attacker's grid, to find where detection weakens:
# (scope, lr, multiple of --steps), applied to a keep-2 derivative (float32, experts shuffled).
STRESS = {
    "full 3e-3, 8x steps": ("all", 3e-3, 8),
    "full 1e-2": ("all", 1e-2, 1),
    "full 1e-2, 8x steps": ("all", 1e-2, 8),
}
# Part of the cache key: raise it when a change here alters what a cached group holds.
CACHE_VERSION = 3
CASTS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auroc(positives: list[float], negatives: list[float]) -> float:
    """``P(score of a positive > score of a negative)``, ties counting one half (Mann-Whitney U / n_pos n_neg)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def per_layer(keep: list[int], num_layers: int) -> list[int]:
    """Keep count of every layer: a single count for all, a longer pattern cycled over the layers."""
    return [keep[layer % len(keep)] for layer in range(num_layers)]


def non_expert_parameters(moe: MoEModel) -> list[torch.nn.Parameter]:
    routed = {id(p) for layer in moe.layers for p in layer.expert_parameters() + layer.router_parameters()}
    return [p for p in moe.model.parameters() if id(p) not in routed]


def realign(moe: MoEModel, scope: str, lr: float, args: argparse.Namespace, seed: int, *, multiple: int = 1) -> float:
    """Fine-tune ``moe`` in place on the target task (``scope`` "all" or "non-expert") for ``multiple``
    times ``--steps`` steps; the final loss."""
    steps = args.steps * multiple
    data = load_task(args.task, "train", limit=steps * args.batch_size, seed=seed)
    result = train(
        moe,
        batches(moe.tokenizer, data, batch_size=args.batch_size, shuffle=True, seed=seed, epochs=None),
        steps=steps,
        lr=lr,
        parameters=None if scope == "all" else non_expert_parameters(moe),
        seed=seed,
        progress=False,
    )
    return result.final_loss


def variants(base: MoEModel, orders: list[list[int]], seed: int) -> Iterator[tuple[bool, str, MoEModel, list[list[int]]]]:
    """(permuted, cast, suspect, true order) for every permute x cast combination."""
    for permuted, (cast, dtype) in itertools.product((False, True), CASTS.items()):
        suspect = copy.deepcopy(base)
        truth = orders
        if permuted:
            shuffles = [torch.randperm(len(o), generator=torch.Generator().manual_seed(seed + i)).tolist() for i, o in enumerate(orders)]
            reindex_experts(suspect, shuffles)
            truth = [[o[j] for j in s] for o, s in zip(orders, shuffles)]
        suspect.model.to(dtype)
        yield permuted, cast, suspect, truth


def forward_seconds(moe: MoEModel) -> float:
    """Wall time of one forward pass of ``moe`` on a 16 x 64 batch of random tokens (median of three)."""
    ids = torch.randint(3, moe.model.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            moe.model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def detector_source_hash() -> str:
    """Hash of the forensics package's source: cached comparisons are only reused for the same detector."""
    digest = hashlib.sha256()
    for path in sorted(Path(moeguard.forensics.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def cache_dir(parent: MoEModel, args: argparse.Namespace) -> Path:
    settings = {
        "parent": parent.fingerprint(),
        "task": args.task,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "independent_steps": args.independent_steps,
        "detector": detector_source_hash(),
        "version": CACHE_VERSION,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "bench_detect" / key


def score_figure(rows: list[dict], threshold: float, path: Path) -> None:
    """Scores per group (derived by re-alignment setting; not derived by kind), threshold dashed."""
    from moeguard.plotting import pyplot, save_figure

    plt = pyplot()
    groups: dict[str, list[float]] = {}
    for row in rows:
        if not row["derived_truth"]:
            label = f"not derived: {row['kind']}"
        else:
            label = f"{'derived' if row['kind'] == 'derivative' else 'stress'}: {row['realign']}"
        groups.setdefault(label, []).append(row["z"])
    labels = [f"stress: {name}" for name in STRESS if f"stress: {name}" in groups]
    labels += [f"derived: {name}" for name in REALIGN if f"derived: {name}" in groups]
    labels += sorted(label for label in groups if label not in labels)
    figure, axes = plt.subplots(figsize=(8, 0.55 * len(groups) + 1.5), layout="constrained")
    for y, label in enumerate(labels):
        values = groups[label]
        jitter = torch.linspace(-0.2, 0.2, len(values)).tolist() if len(values) > 1 else [0.0]
        color = {"not": "tab:red", "derived": "tab:blue", "stress": "tab:purple"}[label.split()[0].rstrip(":")]
        axes.scatter(values, [y + j for j in jitter], s=12, alpha=0.7, color=color)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xscale("symlog", linthresh=10)
    scores = [z for values in groups.values() for z in values]
    axes.set_xlim(min(-10.0, 1.5 * min(scores)), 2.0 * max(scores + [threshold]))
    axes.set_ylim(-0.6, len(labels) - 0.4)
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1)
    axes.text(threshold, -0.5, f" threshold z = {threshold:.2f}", fontsize=8, va="bottom")
    axes.set_xlabel("detection score z (symlog)")
    axes.set_title("moeguard detect: demo-model derivatives vs independent models")
    save_figure(figure, path)


def stable_seed(name: str) -> int:
    """A seed fixed by a group's name, so adding a setting leaves every other group's draws unchanged."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def summarise(rows: list[dict], parent: MoEModel, negative_models: int, args: argparse.Namespace) -> dict:
    derived = [r for r in rows if r["kind"] == "derivative"]
    negatives = [r for r in rows if not r["derived_truth"]]
    positives = [r["z"] for r in derived]
    negative_scores = [r["z"] for r in negatives]
    seconds = [r["seconds"] for r in rows]
    layer_kept = [ok for r in derived for ok in r["kept_exact"]]
    layer_orders = [ok for r in derived for ok in r["order_exact"]]

    def by(field: str, names, value) -> dict:
        return {name: value([r for r in derived if r[field] == name]) for name in names}

    return {
        "parent": parent.source,
        "parent_fingerprint": parent.fingerprint(),
        "derivatives": len(positives),
        "negative_comparisons": len(negative_scores),
        "negative_models": negative_models,
        "auroc": auroc(positives, negative_scores),
        "z_threshold": z_threshold(DEFAULT_ALPHA),
        "alpha": DEFAULT_ALPHA,
        "true_positives": sum(r["status"] == "derived" for r in derived),
        "false_positives": sum(r["status"] == "derived" for r in negatives),
        "min_z_derived": min(positives),
        "max_z_negative": max(negative_scores),
        "negative_z_mean": statistics.mean(negative_scores),
        "negative_z_std": statistics.stdev(negative_scores) if len(negative_scores) > 1 else None,
        "layers": len(layer_kept),
        "kept_set_exact": share(layer_kept),
        "order_exact": share(layer_orders),
        "kept_set_misses": [
            {"name": r["name"], "layer": layer, "truth": sorted(t), "recovered": k}
            for r in derived
            for layer, (ok, t, k) in enumerate(zip(r["kept_exact"], r["truth"], r["kept"]))
            if not ok
        ],
        "median_seconds_per_comparison": statistics.median(seconds),
        "max_seconds_per_comparison": max(seconds),
        "median_forward_seconds": statistics.median(r["forward_seconds"] for r in rows),
        "comparison_to_forward_ratio": statistics.median(r["seconds"] / r["forward_seconds"] for r in rows),
        "min_z_by_realign": by("realign", REALIGN, lambda rs: min(r["z"] for r in rs)),
        "kept_set_exact_by_realign": by("realign", REALIGN, lambda rs: share([ok for r in rs for ok in r["kept_exact"]])),
        "min_z_by_keep": by("keep", KEEPS, lambda rs: min(r["z"] for r in rs)),
        "min_z_by_cast": by("cast", CASTS, lambda rs: min(r["z"] for r in rs)),
        "min_weight_similarity_by_realign": by("realign", REALIGN, lambda rs: min(r["min_weight_similarity"] for r in rs)),
        "min_response_similarity_by_realign": by("realign", REALIGN, lambda rs: min(r["min_similarity"] for r in rs)),
        "realign_final_loss": {
            f"keep {r['keep']} | {r['realign']}": r["realign_loss"] for r in derived if r["realign_loss"] is not None and not r["permuted"] and r["cast"] == "float32"
        },
        "settings": vars(args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("default", "tiny"), default="default", help="demo model: DemoConfig() or TINY_DEMO")
    parser.add_argument("--task", default="reverse", help="target task of the re-alignment runs")
    parser.add_argument("--steps", type=int, default=160, help="re-alignment steps (moeguard realign: 4 rounds x 40)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--independent", type=int, default=10, help="demo-architecture models trained from other seeds")
    parser.add_argument("--independent-steps", type=int, default=300)
    parser.add_argument("--full-independent", type=int, default=0,
                        help="also this many same-architecture models trained with the parent's full recipe (seeds 101, ...)")
    parser.add_argument("--unrelated", default="mixtral,gpt_oss", help="families of the unrelated demo-size MoEs")
    parser.add_argument("--stress", action="store_true", help="also run the heavier re-alignments of STRESS (reported apart)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/detect/<config>")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/detect/{args.config}")
    started = time.perf_counter()

    config = DemoConfig() if args.config == "default" else TINY_DEMO
    parent = load_moe(demo_model_path(config, seed=0))
    cache = cache_dir(parent, args)
    print(f"parent: {parent.source} ({parent.model_type}, {parent.num_layers} MoE layers x {parent.num_experts[0]} experts)")
    print(f"cache: {cache}")
    rows: list[dict] = []

    def compare(suspect: MoEModel, record: dict, truth: list[list[int]] | None) -> dict:
        forward = forward_seconds(parent)
        verdict = detect(parent, suspect, progress=False)
        record.update(forward_seconds=forward, z=verdict.z, p_value=verdict.p_value, status=verdict.status, seconds=verdict.seconds)
        if truth is not None:
            record["truth"] = truth
            record["kept"] = [lv.kept for lv in verdict.layers]
            record["order_exact"] = [lv.order == t for lv, t in zip(verdict.layers, truth)]
            record["kept_exact"] = [lv.kept == sorted(t) for lv, t in zip(verdict.layers, truth)]
            matched = [m for lv in verdict.layers for m in lv.matches if m.parent_expert is not None]
            record["min_similarity"] = min((m.similarity for m in matched), default=None)
            record["min_weight_similarity"] = min((m.weight_similarity for m in matched), default=None)
        print(f"  {record['name']:<52} z = {verdict.z:8.1f}  {verdict.status}  ({verdict.seconds:.2f} s)", flush=True)
        return record

    build_costs: list[dict] = []

    def cached_group(name: str, build) -> list[dict]:
        """The rows of group ``name``: from the cache, or built (and timed: wall and process CPU) and cached."""
        path = cache / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            group = read_json(path, what="cached benchmark group")
            for record in group["rows"]:
                print(f"  {record['name']:<52} z = {record['z']:8.1f}  {record['status']}  (cached)", flush=True)
        else:
            wall, cpu = time.perf_counter(), time.process_time()
            group = {"group": name, "rows": build()}
            group.update(wall_seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu)
            write_json(path, group)
        build_costs.append({key: group.get(key) for key in ("group", "wall_seconds", "cpu_seconds")})
        return group["rows"]

    print("derivatives:")
    for (keep_name, keep), (realign_name, realign_setting) in itertools.product(KEEPS.items(), REALIGN.items()):
        group_name = f"derivative {keep_name} | {realign_name}"

        def build_derivatives(keep_name=keep_name, keep=keep, realign_name=realign_name, realign_setting=realign_setting,
                              seed=stable_seed(group_name)) -> list[dict]:
            base = copy.deepcopy(parent)
            orders = [sorted(o) for o in random_orders(base, per_layer(keep, base.num_layers), seed=seed)]
            reindex_experts(base, orders)
            loss = realign(base, *realign_setting, args, seed=seed) if realign_setting is not None else None
            group = []
            for permuted, cast, suspect, truth in variants(base, orders, seed=seed + 1):
                name = f"keep {keep_name} | {realign_name} | {'shuffled' if permuted else 'sorted'} | {cast}"
                record = dict(name=name, derived_truth=True, kind="derivative", keep=keep_name, realign=realign_name,
                              permuted=permuted, cast=cast, realign_loss=loss)
                group.append(compare(suspect, record, truth))
            return group

        rows += cached_group(group_name, build_derivatives)

    print("independent and unrelated models:")
    negatives = [
        (f"{config.family} seed {seed}", "independent (same architecture)", dataclasses.replace(config, steps=args.independent_steps), seed)
        for seed in range(1, args.independent + 1)
    ]
    negatives += [
        (f"{config.family} seed {seed} (full recipe)", "independent (full training)", config, seed)
        for seed in range(101, 101 + args.full_independent)
    ]
    # Other seeds for the other families too: random_moe draws a family's weights from the same
    # stream as the parent's when seeds agree, and equal shapes would then start out equal.
    negatives += [
        (f"{family} seed {1000 + i}", "unrelated family", dataclasses.replace(config, family=family, steps=args.independent_steps), 1000 + i)
        for i, family in enumerate(filter(None, args.unrelated.split(",")))
    ]
    for name, kind, negative_config, seed in negatives:

        def build_negatives(name=name, kind=kind, negative_config=negative_config, seed=seed) -> list[dict]:
            model = load_moe(demo_model_path(negative_config, seed=seed, progress=False))
            pruned = copy.deepcopy(model)
            reindex_experts(pruned, random_orders(pruned, [4] * pruned.num_layers, seed=seed))
            cast = copy.deepcopy(model)
            cast.model.to(torch.bfloat16)
            return [
                compare(suspect, dict(name=f"{name} | {variant}", derived_truth=False, kind=kind, realign="-", model=name), None)
                for variant, suspect in (("as is", model), ("keep 4 shuffled", pruned), ("bfloat16", cast))
            ]

        rows += cached_group(f"negative {name} | {negative_config.key(seed)}", build_negatives)

    if args.stress:
        print("stress (heavier re-alignment than the attacker's grid, keep 2):")
        for stress_name, (scope, lr, multiple) in STRESS.items():
            group_name = f"stress {stress_name}"

            def build_stress(stress_name=stress_name, scope=scope, lr=lr, multiple=multiple, seed=stable_seed(group_name)) -> list[dict]:
                base = copy.deepcopy(parent)
                orders = random_orders(base, [2] * base.num_layers, seed=seed)
                reindex_experts(base, orders)
                loss = realign(base, scope, lr, args, seed=seed, multiple=multiple)
                record = dict(name=f"keep 2 | {stress_name} | shuffled | float32", derived_truth=True, kind="stress", keep="2",
                              realign=stress_name, permuted=True, cast="float32", realign_loss=loss, steps=args.steps * multiple)
                return [compare(base, record, orders)]

            rows += cached_group(group_name, build_stress)

    summary = summarise(rows, parent, len(negatives), args)
    summary["stress"] = [
        {key: r[key] for key in ("name", "steps", "realign_loss", "z", "status", "kept_exact", "order_exact", "min_similarity", "min_weight_similarity")}
        for r in rows
        if r["kind"] == "stress"
    ]
    timed = [cost for cost in build_costs if cost["wall_seconds"] is not None]
    # What building every group cost when it was built (independent models trained inside their group
    # unless the demo cache already held them), whichever run built it.
    summary["build_cost"] = {
        "groups": len(build_costs),
        "groups_timed": len(timed),
        "wall_seconds": sum(cost["wall_seconds"] for cost in timed),
        "cpu_seconds": sum(cost["cpu_seconds"] for cost in timed),
        "load_average_end": os.getloadavg()[0],
    }
    summary["wall_seconds_this_run"] = time.perf_counter() - started
    summary["cache"] = str(cache)
    write_json(out / "results.json", {"summary": summary, "rows": rows})
    score_figure(rows, summary["z_threshold"], out / "detect_scores.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
