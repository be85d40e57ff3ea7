"""Sweep cost: K points in mask mode vs reload + prune + evaluate per point (ratio).

Both ways evaluate the same K plans (criteria x keep counts, from one attribution)
on the same tasks and perplexity text: mask mode wraps the loaded model in
``mask_experts``; the other way loads the model from disk, prunes it physically and
evaluates the copy. Points are interleaved (mask i, reload i, ...); the ratio of the
totals and the median per-point ratio are printed, and the accuracies of the two
ways are checked to be equal (they compute the same function).

    python benchmarks/bench_sweep.py [--model demo|DIR] [--keep 6,4,3,2] [--limit 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moeguard.attribution import collect_attribution, scores
from moeguard.data import batches, load_task
from moeguard.models import load_moe
from moeguard.pruning.plans import make_plan
from moeguard.pruning.sweep import SweepPoint, evaluate_point, text_of_tasks


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, process CPU) seconds since ``start``; CPU time is less disturbed by other processes."""
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


def model_directory(name: str, workdir: Path) -> Path:
    """The demo model's directory, a given directory, or a random Qwen3-MoE with the char tokenizer saved to ``workdir``."""
    if name == "demo":
        from moeguard.zoo import demo_model_path

        return Path(demo_model_path())
    if name != "random":
        return Path(name)
    from moeguard.data import build_char_tokenizer
    from moeguard.models.random_init import random_moe

    tokenizer = build_char_tokenizer()
    moe = random_moe("qwen3_moe", layers=4, experts=8, hidden=128, intermediate=128, vocab=len(tokenizer))
    moe.tokenizer = tokenizer
    moe.save(workdir / "random_model")
    return workdir / "random_model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo', 'random' or a model directory")
    parser.add_argument("--task", default="addition")
    parser.add_argument("--other-tasks", default="reverse,upper")
    parser.add_argument("--criteria", default="frequency,reap")
    parser.add_argument("--keep", default=None, help="keep counts (default: 3/4, 1/2, 3/8, 1/4 of the experts)")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory(prefix="bench_sweep.") as tmp:
        directory = model_directory(args.model, Path(tmp))
        moe = load_moe(directory)
        datas = [load_task(name, "test", limit=args.limit) for name in [args.task, *args.other_tasks.split(",")]]
        text = text_of_tasks(datas)
        train = load_task(args.task, "train", limit=128)
        attribution = collect_attribution(moe, batches(moe.tokenizer, train, batch_size=32), criteria=args.criteria.split(","),
                                          task=args.task, progress=False)
        experts = min(moe.num_experts)
        keeps = [int(k) for k in args.keep.split(",")] if args.keep else sorted(
            {max(max(moe.top_k), round(experts * f)) for f in (0.75, 0.5, 0.375, 0.25)}, reverse=True)
        plans = [make_plan(scores(attribution, c), moe.layers, keep=k) for k in keeps for c in args.criteria.split(",")]
        print(f"model: {directory} ({moe.model_type}, {moe.num_layers} MoE layers x {experts} experts, "
              f"{moe.parameter_counts().total / 1e6:.1f}M parameters); {len(plans)} points, tasks "
              f"{[d.name for d in datas]} x {args.limit} examples + perplexity")

        def point() -> SweepPoint:
            return SweepPoint("bench", 0, None, 0.0, [], {}, None, 0.0)

        evaluate_point(moe, point(), datas, text, args.batch_size)  # warm-up
        mask_times, reload_times, load_times = [], [], []  # (wall, process CPU) seconds
        for plan in plans:
            start = clocks()
            with moe.mask_experts(plan.keep_sets()):
                masked = point()
                evaluate_point(moe, masked, datas, text, args.batch_size)
            mask_times.append(since(start))

            start = clocks()
            copy = load_moe(directory)
            copy.prune(plan.keep_sets())
            load_times.append(since(start))
            pruned = point()
            evaluate_point(copy, pruned, datas, text, args.batch_size)
            reload_times.append(since(start))
            del copy
            assert masked.accuracy == pruned.accuracy, f"mask mode and the pruned copy disagree: {masked} vs {pruned}"
            assert abs(masked.perplexity - pruned.perplexity) <= 1e-4 * masked.perplexity, (masked, pruned)
            assert abs(masked.answer_loss - pruned.answer_loss) <= 1e-4 * masked.answer_loss, (masked, pruned)

        for label, column in (("wall", 0), ("process CPU", 1)):
            mask = [t[column] for t in mask_times]
            reload = [t[column] for t in reload_times]
            load = [t[column] for t in load_times]
            ratios = [r / m for m, r in zip(mask, reload)]
            print(f"{label} time: mask mode total {sum(mask):.1f}s (median {statistics.median(mask):.2f}s per point); "
                  f"reload+prune+evaluate total {sum(reload):.1f}s (median {statistics.median(reload):.2f}s, of which "
                  f"load + prune {statistics.median(load):.2f}s); reload / mask {sum(reload) / sum(mask):.2f}x over the "
                  f"sweep, median per point {statistics.median(ratios):.2f}x")
        print("accuracies, answer losses and perplexities identical at every point")


if __name__ == "__main__":
    main()
