"""Benchmark: detecting pruned, re-aligned, re-ordered and cast derivatives of the demo model.

Positives: derivatives of the demo model, every combination of
  prune      keep 8 (none), 6, 4, 2 of 8 experts per layer, and a non-uniform 6, 4, 2, 3 per layer
             (cycled over the layers; random kept sets; the non-uniform one lives in memory, as it
             would in a custom checkpoint);
  re-align   none; full fine-tuning of every parameter at lr 1e-4, 1e-3, 3e-3; fine-tuning of the
             non-expert parameters only (attention, embeddings, norms) at 1e-3 - each run is
             `--steps` AdamW steps of batch `--batch-size` on the target task's training split,
             with moeguard.training.train (the loop `moeguard realign` uses);
  permute    kept experts in ascending order, or shuffled (router rows moved with them);
  cast       float32, bfloat16, float16.
Negatives: demo-architecture models trained from other seeds (`--independent` of them, `--independent-steps`
steps each: short but real training runs of the demo recipe, cached in the demo model cache), and demo-size
models of other families (unrelated MoEs), each compared as is, pruned to 4 shuffled experts, and cast to
bfloat16.

Reports AUROC of the score z (derived = positive), decisions at the stated threshold, the share of
(derivative, layer) pairs whose kept set and expert order are recovered exactly, and the time per
comparison (median; also as a ratio to one forward pass of the parent on a 16 x 64 batch measured in the
same run). Writes results.json and a figure of the scores to --out.

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
    "full 1e-3": ("all", 1e-3),
    "full 3e-3": ("all", 3e-3),
    "non-expert 1e-3": ("non-expert", 1e-3),
}
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


def realign(moe: MoEModel, scope: str, lr: float, args: argparse.Namespace, seed: int) -> float:
    """Fine-tune ``moe`` in place on the target task (``scope`` "all" or "non-expert"); the final loss."""
    data = load_task(args.task, "train", limit=args.steps * args.batch_size, seed=seed)
    result = train(
        moe,
        batches(moe.tokenizer, data, batch_size=args.batch_size, shuffle=True, seed=seed, epochs=None),
        steps=args.steps,
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
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "bench_detect" / key


def score_figure(rows: list[dict], threshold: float, path: Path) -> None:
    from moeguard.attribution.figures import _pyplot, _save

    plt = _pyplot()
    groups: dict[str, list[float]] = {}
    for row in rows:
        label = f"not derived: {row['kind']}" if not row["derived_truth"] else f"derived: {row['realign']}"
        groups.setdefault(label, []).append(row["z"])
    labels = sorted(groups)
    figure, axes = plt.subplots(figsize=(8, 0.55 * len(groups) + 1.5), layout="constrained")
    for y, label in enumerate(labels):
        values = groups[label]
        jitter = torch.linspace(-0.2, 0.2, len(values)).tolist() if len(values) > 1 else [0.0]
        color = "tab:red" if label.startswith("not") else "tab:blue"
        axes.scatter(values, [y + j for j in jitter], s=12, alpha=0.7, color=color)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xscale("symlog", linthresh=10)
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1)
    axes.text(threshold, len(labels) - 0.5, f" threshold z = {threshold:.2f}", fontsize=8)
    axes.set_xlabel("detection score z (symlog)")
    axes.set_title("moeguard detect: demo-model derivatives vs independent models")
    _save(figure, path)


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def summarise(rows: list[dict], parent: MoEModel, negative_models: int, forward: float, args: argparse.Namespace) -> dict:
    derived = [r for r in rows if r["derived_truth"]]
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
        "median_forward_seconds": forward,
        "comparison_to_forward_ratio": statistics.median(seconds) / forward,
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
    parser.add_argument("--unrelated", default="mixtral,gpt_oss", help="families of the unrelated demo-size MoEs")
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
    forward = forward_seconds(parent)
    rows: list[dict] = []

    def compare(suspect: MoEModel, record: dict, truth: list[list[int]] | None) -> dict:
        verdict = detect(parent, suspect, progress=False)
        record.update(z=verdict.z, p_value=verdict.p_value, status=verdict.status, seconds=verdict.seconds)
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

    def cached_group(name: str, build) -> list[dict]:
        path = cache / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            group = read_json(path, what="cached benchmark group")
            for record in group["rows"]:
                print(f"  {record['name']:<52} z = {record['z']:8.1f}  {record['status']}  (cached)", flush=True)
            return group["rows"]
        group_rows = build()
        write_json(path, {"group": name, "rows": group_rows})
        return group_rows

    print("derivatives:")
    for k, ((keep_name, keep), (realign_name, realign_setting)) in enumerate(itertools.product(KEEPS.items(), REALIGN.items())):

        def build_derivatives(k=k, keep_name=keep_name, keep=keep, realign_name=realign_name, realign_setting=realign_setting) -> list[dict]:
            base = copy.deepcopy(parent)
            orders = [sorted(o) for o in random_orders(base, per_layer(keep, base.num_layers), seed=100 + k)]
            reindex_experts(base, orders)
            loss = realign(base, *realign_setting, args, seed=k) if realign_setting is not None else None
            group = []
            for permuted, cast, suspect, truth in variants(base, orders, seed=1000 * k):
                name = f"keep {keep_name} | {realign_name} | {'shuffled' if permuted else 'sorted'} | {cast}"
                record = dict(name=name, derived_truth=True, kind="derivative", keep=keep_name, realign=realign_name,
                              permuted=permuted, cast=cast, realign_loss=loss)
                group.append(compare(suspect, record, truth))
            return group

        rows += cached_group(f"derivative {keep_name} | {realign_name}", build_derivatives)

    print("independent and unrelated models:")
    negatives = [
        (f"{config.family} seed {seed}", "independent (same architecture)", dataclasses.replace(config, steps=args.independent_steps), seed)
        for seed in range(1, args.independent + 1)
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

    summary = summarise(rows, parent, len(negatives), forward, args)
    summary["wall_seconds_this_run"] = time.perf_counter() - started
    summary["cache"] = str(cache)
    write_json(out / "results.json", {"summary": summary, "rows": rows})
    score_figure(rows, summary["z_threshold"], out / "detect_scores.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
