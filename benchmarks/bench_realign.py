"""Re-alignment on the demo model: recovery curves per acquisition function, and training throughput.

The attack end to end: attribution of the target task on the demo model (routing
frequency), a physical prune to ``--keep`` experts per MoE layer, then
:func:`moeguard.realign.realign` on the pruned model for every acquisition function
and seed with the same label schedule, steps and learning rate. Reported per
acquisition function: retention after each round (mean over seeds), labels needed
to reach 90% retention, and the label-efficiency ratio against random selection
(labels random needs / labels the function needs; also the ratio of the areas
under the retention curves, defined even when 90% is not reached).

Throughput: tokens per second of moeguard's fine-tuning step (``training.train`` on
the pruned model, and in mask mode on the unpruned model) against a plain PyTorch
loop (forward, cross-entropy, backward, AdamW step) over the same pruned model and
batches, interleaved, median of ``--repeats``.

The figure and ``summary.json`` go to ``--out``; the pruned model and every run to
``--workdir``, so rerunning the command skips finished runs.

    python benchmarks/bench_realign.py [--task reverse] [--keep 2] [--budget 96] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moeguard.attribution import scores
from moeguard.attribution.run import attribute
from moeguard.data import batches, load_task, model_inputs
from moeguard.io import write_json
from moeguard.models import load_moe
from moeguard.pruning.plans import make_plan
from moeguard.realign import ACQUISITIONS, RealignConfig, RealignResult, builtin_data, realign
from moeguard.realign.figures import recovery_figure
from moeguard.realign.scopes import scope_parameters
from moeguard.training import token_cross_entropy, train
from moeguard.zoo import TINY_DEMO, DemoConfig, demo_model_path


def prune_demo(source: Path, task: str, keep: int, out: Path) -> list[list[int]]:
    """Prune the demo model to the ``keep`` most frequently routed experts of ``task`` per layer."""
    if (out / "config.json").is_file():
        return load_moe(out).expert_ids
    moe = load_moe(source)
    run = attribute(moe, load_task(task, "train", limit=256), criteria=["frequency"], progress=False)
    plan = make_plan(scores(run.attribution, "frequency"), moe.layers, keep=keep, task=task)
    moe.prune(dict(enumerate(plan.kept)), selection={"criterion": "frequency", "keep": keep, "task": task})
    moe.save(out)
    return plan.kept


def area_under_retention(result: RealignResult) -> float:
    """Trapezoid area under retention vs labels, divided by the budget (mean retention over the label axis)."""
    points = [(r.labels, r.retention) for r in result.rounds]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / points[-1][0]


def labels_summary(runs: list[RealignResult]) -> tuple[float, str]:
    """(mean labels to the target over the seeds that reach it, or inf; "n/seeds reached")."""
    reached = [run.threshold.labels for run in runs if run.threshold.reached]
    mean = sum(reached) / len(reached) if reached else math.inf
    return mean, f"{len(reached)}/{len(runs)}"


def plain_loop_seconds(moe, stream, steps: int, lr: float) -> float:
    """A plain PyTorch fine-tuning loop: forward, cross-entropy, backward, AdamW step."""
    params = [p for p in moe.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    moe.model.train()
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(stream)
        loss = token_cross_entropy(moe.model(**model_inputs(batch)).logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    moe.model.eval()
    return time.perf_counter() - start


def throughput(source: Path, pruned_dir: Path, kept: list[list[int]], task: str, args) -> dict[str, float]:
    """Tokens per second: moeguard's train() (pruned and mask mode) vs a plain loop on the pruned model."""
    pruned = load_moe(pruned_dir)
    unpruned = load_moe(source)
    keep = dict(enumerate(kept))
    data = load_task(task, "train", limit=args.batch_size * args.throughput_steps)

    def stream():
        return batches(pruned.tokenizer, data, batch_size=args.batch_size, shuffle=True, seed=0, epochs=None)

    tokens = sum(int(b["attention_mask"].sum()) for _, b in zip(range(args.throughput_steps), stream()))

    def moeguard_pruned() -> float:
        start = time.perf_counter()
        train(pruned, stream(), steps=args.throughput_steps, lr=args.lr, parameters=list(scope_parameters(pruned, "all").values()),
              progress=False)
        return time.perf_counter() - start

    def moeguard_mask() -> float:
        start = time.perf_counter()
        with unpruned.mask_experts(keep):
            train(unpruned, stream(), steps=args.throughput_steps, lr=args.lr, progress=False)
        return time.perf_counter() - start

    def plain() -> float:
        return plain_loop_seconds(pruned, stream(), args.throughput_steps, args.lr)

    timings: dict[str, list[float]] = {"plain": [], "moeguard_pruned": [], "moeguard_mask": []}
    plain()  # warm-up
    for _ in range(args.repeats):
        timings["plain"].append(plain())
        timings["moeguard_pruned"].append(moeguard_pruned())
        timings["moeguard_mask"].append(moeguard_mask())
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "tokens_per_step_run": tokens,
        **{f"{name}_tokens_per_second": tokens / seconds for name, seconds in medians.items()},
        "ratio_pruned_vs_plain": medians["plain"] / medians["moeguard_pruned"],
        "ratio_mask_vs_plain": medians["plain"] / medians["moeguard_mask"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", choices=("default", "tiny"), default="default",
                        help="the demo model (default) or the tiny one the tests use (2 layers, 4 tasks)")
    parser.add_argument("--task", default="reverse")
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--acquisitions", default=",".join(ACQUISITIONS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--seed-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps-per-round", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--scope", default="all")
    parser.add_argument("--pool-size", type=int, default=384)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--other-size", type=int, default=50)
    parser.add_argument("--throughput-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine two threads waiting on each other are slower)")
    parser.add_argument("--out", default="benchmarks/results/realign", help="where the figure and summary.json go")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "moeguard-bench-realign"),
                        help="the pruned model and every run's state (a rerun skips finished runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = TINY_DEMO if args.demo == "tiny" else DemoConfig()
    source = demo_model_path(demo, progress=False)
    # Keyed by the demo model's cache key: a retrained demo never meets another model's prune or runs.
    work = Path(args.workdir) / f"{args.demo}-{source.name}"
    pruned_dir = work / f"{args.task}_keep{args.keep}"
    kept = prune_demo(source, args.task, args.keep, pruned_dir)
    print(f"demo model {source}; {args.task}: kept experts per layer {kept}")
    others = [task for task in demo.tasks if task != args.task]  # the tasks the demo model was trained on
    data = builtin_data(args.task, pool_size=args.pool_size, test_size=args.test_size, other_size=args.other_size,
                        other_tasks=others)

    acquisitions = args.acquisitions.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[RealignResult]] = {name: [] for name in acquisitions}
    for seed in seeds:
        for name in acquisitions:
            config = RealignConfig(
                budget=args.budget, seed_size=args.seed_size, rounds=args.rounds, acquisition=name, scope=args.scope,
                lr=args.lr, steps_per_round=args.steps_per_round, batch_size=args.batch_size, seed=seed,
            )
            run_started = time.perf_counter()
            result = realign(pruned_dir, data, config, out=work / "runs" / f"{args.task}_keep{args.keep}_{name}_seed{seed}", resume=True, progress=False)
            results[name].append(result)
            curve = " ".join(f"{r.retention:.2f}" for r in result.rounds)
            print(f"{name:>16} seed {seed}: retention by round {curve}  ({time.perf_counter() - run_started:.0f}s)", flush=True)

    first = results[acquisitions[0]][0]
    print(f"\nunpruned accuracy {first.unpruned_accuracy:.3f}, pruned (keep {args.keep}) {first.pruned_accuracy:.3f}; "
          f"labels {[r.labels for r in first.rounds]}, {args.steps_per_round} steps per round")
    random_labels, _ = labels_summary(results.get("random", []) or [first])
    random_area = statistics.mean(area_under_retention(r) for r in results.get("random", [first]))
    header = ("| acquisition | final retention (mean, min-max) | other-task retention, pruned -> final | labels to 90% (mean) "
              "| seeds reaching 90% | label-efficiency vs random | retention AUC vs random |")
    rows = [header, "|" + "---|" * 7]
    summary = {}
    for name, runs in results.items():
        finals = [r.final.retention for r in runs]
        labels, reached = labels_summary(runs)
        area = statistics.mean(area_under_retention(r) for r in runs)
        efficiency = random_labels / labels if math.isfinite(labels) and math.isfinite(random_labels) else math.nan
        summary[name] = {
            "final_retention": finals, "other_retention": [r.final.other_retention for r in runs],
            "labels_to_target": [r.threshold.labels for r in runs], "area_ratio_vs_random": area / random_area,
            "label_efficiency_vs_random": efficiency, "curves": [[r.retention for r in run.rounds] for run in runs],
        }
        rows.append(
            f"| {name} | {statistics.mean(finals):.3f} ({min(finals):.3f}-{max(finals):.3f}) | "
            f"{statistics.mean(r.rounds[0].other_retention for r in runs):.3f} -> "
            f"{statistics.mean(r.final.other_retention for r in runs):.3f} | "
            f"{labels:.0f} | {reached} | {efficiency:.2f} | {area / random_area:.3f} |"
        )
    print("\n".join(rows))
    figure = recovery_figure(results, out / f"recovery_{args.demo}_{args.task}_keep{args.keep}.png",
                             title=f"Re-alignment of {args.task} after keeping {args.keep} of 8 experts per layer (demo model)")
    print(f"figure: {figure}")

    speed = throughput(source, pruned_dir, kept, args.task, args)
    print(f"\nthroughput ({args.throughput_steps} steps of {args.batch_size}, median of {args.repeats}): "
          f"plain loop {speed['plain_tokens_per_second']:.0f} tok/s; moeguard train() on the pruned model "
          f"{speed['moeguard_pruned_tokens_per_second']:.0f} tok/s (ratio {speed['ratio_pruned_vs_plain']:.3f}); "
          f"in mask mode {speed['moeguard_mask_tokens_per_second']:.0f} tok/s (ratio {speed['ratio_mask_vs_plain']:.3f})")
    elapsed = time.perf_counter() - started
    write_json(out / f"summary_{args.demo}_{args.task}_keep{args.keep}.json",
               {"args": vars(args), "model": str(source), "kept": kept, "acquisitions": summary, "throughput": speed,
                "seconds": elapsed})
    print(f"total {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
