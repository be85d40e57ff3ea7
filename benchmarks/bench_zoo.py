"""The demo model: training time, per-task test accuracy, and evaluation throughput.

1. Trains the default demo model (``DemoConfig()``) from scratch and reports its wall
   and process CPU time, the machine's load while it trained, and every task's test
   score in its metric with the best score possible and the share of the way to it
   (targets: < 15 minutes on 2 cores, >= 90% of the best score on every task).
2. Measures evaluation throughput (examples per second) of batched greedy generation
   against one example at a time, on the same examples of the generation tasks,
   interleaved repeats; reports the medians and their ratio, and checks both give the
   same predictions.

    python benchmarks/bench_zoo.py [--seed 0] [--repeats 3] [--single-examples 40] [--reuse DIR]
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (set before torch loads): on a shared
# machine, spinning threads stall every parallel region.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from moeguard.data import load_task  # noqa: E402
from moeguard.eval import evaluate  # noqa: E402
from moeguard.models import load_moe  # noqa: E402
from moeguard.zoo import CARD_JSON, DemoConfig, train_demo  # noqa: E402


def throughput(moe, datas, batch_size: int) -> tuple[float, float, list[list[str]]]:
    """(examples per second by wall time, by process CPU time, predictions) over ``datas``."""
    wall, cpu = time.perf_counter(), time.process_time()
    predictions = [evaluate(moe, None, data, batch_size=batch_size).predictions for data in datas]
    examples = sum(len(data) for data in datas)
    return examples / (time.perf_counter() - wall), examples / (time.process_time() - cpu), predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the throughput measurement")
    parser.add_argument("--batch-size", type=int, default=200, help="batch size of batched evaluation")
    parser.add_argument("--single-examples", type=int, default=40, help="examples per task in the throughput comparison")
    parser.add_argument("--reuse", type=Path, default=None, help="skip training: measure an already trained demo model directory")
    args = parser.parse_args()

    if args.reuse is None:
        out = Path(tempfile.mkdtemp(prefix="bench_zoo.")) / "demo"
        train_demo(out, DemoConfig(), seed=args.seed, progress=False)
    else:
        out = args.reuse
    card = json.loads((out / CARD_JSON).read_text())
    training = card["training"]
    print(f"demo model: {out}")
    print(
        f"training: {training['steps']} steps, wall {training['wall_seconds']:.1f} s, process CPU {training['cpu_seconds']:.1f} s, "
        f"{training['threads']} threads, load average {training['load_average_start']:.2f} -> {training['load_average_end']:.2f}"
    )
    print("test scores (n=200 per task): score (95% CI), best possible, share of the way from no knowledge to it")
    for task, result in card["accuracy"].items():
        print(f"  {task:<9} {result['metric']:<16} {result['value']:.3f}  (95% CI {result['ci_low']:.3f}-{result['ci_high']:.3f})"
              f"  best {result['best']:.3f}  share {result['share_of_best']:.3f}")
    print(f"  minimum share of the best score: {min(r['share_of_best'] for r in card['accuracy'].values()):.3f}")
    routing = card["routing"]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print("routing: effective experts per task (mean over layers): "
          + ", ".join(f"{task} {mean(v):.2f}" for task, v in routing["effective_experts"].items())
          + f"; mean top-{card['config']['top_k']} overlap between tasks {mean(routing['mean_top_k_overlap']):.2f}")

    moe = load_moe(out)
    tasks = [task for task in card["config"]["tasks"] if load_task(task, limit=1).kind == "generate"]
    datas = [load_task(task, "test", limit=args.single_examples) for task in tasks]
    throughput(moe, datas[:1], args.batch_size)  # warm-up
    measured = {"batched": [], "single": []}
    predictions = {}
    for _ in range(args.repeats):
        for mode, batch_size in (("batched", args.batch_size), ("single", 1)):
            wall_rate, cpu_rate, predictions[mode] = throughput(moe, datas, batch_size)
            measured[mode].append((wall_rate, cpu_rate))
    medians = {mode: (statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)) for mode, rates in measured.items()}
    examples = sum(len(d) for d in datas)
    print(f"generation throughput ({examples} test examples over {len(tasks)} tasks, median of {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads):")
    for mode in ("batched", "single"):
        print(f"  {mode:<8} {medians[mode][0]:8.1f} examples/s by wall time, {medians[mode][1]:8.1f} by CPU time")
    print(f"  batched / single: {medians['batched'][0] / medians['single'][0]:.1f}x (wall), "
          f"{medians['batched'][1] / medians['single'][1]:.1f}x (CPU)")
    print(f"  same predictions: {predictions['batched'] == predictions['single']}")
    full = [load_task(task, "test") for task in tasks]
    seconds = [evaluate(moe, None, data, batch_size=args.batch_size).seconds for data in full]
    print(f"full test split (200 examples) per task, batched: median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s")
    print(f"load average now: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
