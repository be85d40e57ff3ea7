"""The knowledge-loss sweep at real shapes: K keep points in mask mode against K reloads of pruned copies.

One fresh process per shape loads the random real-shape checkpoint (bf16, as stored),
attributes a task, and evaluates the same K plans (routing frequency at 3/4, 1/2,
1/4 and 1/8 of the experts) three ways, interleaved point by point:

- mask: ``MoEModel.mask_experts`` on the loaded model (what ``moeguard sweep`` does);
- reload: load the checkpoint again, prune the copy in memory, evaluate it;
- stream: ``streaming_prune`` the checkpoint to disk, load the pruned copy, evaluate
  it (what a user without mask mode would do for a model larger than memory).

Every way evaluates the same tasks (target and one other, ``--limit`` examples, plus
perplexity); the accuracies of the three ways are compared at every point, and the
largest relative difference of their answer losses and perplexities is reported. Reported: seconds per point (medians), the totals' ratios, and the peak RSS of
the process (the loaded model plus one copy for the reload ways).

    python benchmarks/bench_shape_sweep.py --workdir /tmp/shapes [--shapes qwen3-30b-a3b,deepseek-v3-narrow] [--limit 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shapes import (
    case_checkpoints,
    directory_bytes,
    emit,
    load_average,
    median,
    new_report,
    remove,
    run_child,
    save_results,
    shape_parser,
)

CASES = {
    "qwen3-30b-a3b": ("qwen3-30b-a3b", 2, {}),
    "deepseek-v3-narrow": ("deepseek-v3", 1, {"moe_intermediate_size": 256}),
}
FRACTIONS = (0.75, 0.5, 0.25, 0.125)


def child(args: argparse.Namespace) -> None:
    from moeguard.attribution import collect_attribution, scores
    from moeguard.data import batches, load_task
    from moeguard.models import load_moe
    from moeguard.pruning.plans import make_plan
    from moeguard.pruning.streaming import streaming_prune
    from moeguard.pruning.sweep import SweepPoint, evaluate_point, text_of_tasks

    source = Path(args.source)
    start = time.perf_counter()
    moe = load_moe(source)
    load_seconds = time.perf_counter() - start
    datas = [load_task(name, "test", limit=args.limit) for name in (args.task, args.other)]
    text = text_of_tasks(datas)
    train = load_task(args.task, "train", limit=32)
    attribution = collect_attribution(moe, batches(moe.tokenizer, train, batch_size=8), criteria=["frequency"],
                                      progress=False)
    layer = moe.layers[0]
    groups = layer.group_routing.num_groups if layer.group_routing else 1
    keeps = sorted({max(layer.top_k, round(layer.num_experts * f / groups) * groups) for f in FRACTIONS}, reverse=True)
    plans = [make_plan(scores(attribution, "frequency"), moe.layers, keep=k) for k in keeps]

    def point() -> SweepPoint:
        return SweepPoint("bench", 0, None, 0.0, [], {}, None, 0.0)

    evaluate_point(moe, point(), datas, text, args.batch_size)  # warm-up
    rows = []
    out = Path(args.out)
    for keep, plan in zip(keeps, plans):
        row = {"keep": keep}
        start = time.perf_counter()
        with moe.mask_experts(plan.keep_sets()):
            masked = point()
            evaluate_point(moe, masked, datas, text, args.batch_size)
        row["mask"] = time.perf_counter() - start

        start = time.perf_counter()
        copy = load_moe(source)
        copy.prune(plan.keep_sets())
        row["reload_load"] = time.perf_counter() - start
        reloaded = point()
        evaluate_point(copy, reloaded, datas, text, args.batch_size)
        row["reload"] = time.perf_counter() - start
        del copy

        remove(out)
        start = time.perf_counter()
        streaming_prune(source, plan.keep_sets(), out, progress=False)
        copy = load_moe(out)
        row["stream_load"] = time.perf_counter() - start
        streamed = point()
        evaluate_point(copy, streamed, datas, text, args.batch_size)
        row["stream"] = time.perf_counter() - start
        del copy
        remove(out)
        row["same"] = masked.accuracy == reloaded.accuracy == streamed.accuracy
        row["accuracy"] = masked.accuracy
        row["loss_difference"] = max(abs(other.answer_loss - masked.answer_loss) / masked.answer_loss
                                     for other in (reloaded, streamed))
        row["perplexity_difference"] = max(abs(other.perplexity - masked.perplexity) / masked.perplexity
                                           for other in (reloaded, streamed))
        rows.append(row)
    emit({"load_seconds": load_seconds, "rows": rows, "experts": layer.num_experts, "layers": moe.num_layers})


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0], CASES)
    parser.add_argument("--task", default="upper")
    parser.add_argument("--other", default="reverse")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    report = new_report(args)
    for name, shape, layers, settings, source in case_checkpoints(args, CASES):
        size = directory_bytes(source)
        loads = [load_average()]
        result = run_child(Path(__file__).resolve(), ["--source", str(source), "--out", str(source.parent / "swept"),
                                                      "--task", args.task, "--other", args.other, "--limit",
                                                      str(args.limit), "--batch-size", str(args.batch_size)])
        loads.append(load_average())
        rows = result["rows"]
        totals = {way: sum(r[way] for r in rows) for way in ("mask", "reload", "stream")}
        summary = {way: median(r[way] for r in rows) for way in ("mask", "reload", "stream", "reload_load", "stream_load")}
        report["cases"][name] = {"shape": shape, "moe_layers": layers, "settings": settings, "checkpoint_bytes": size,
                                 "result": result, "totals": totals, "medians": summary, "load_average": loads}
        print(f"{name}: checkpoint {size / 1e9:.2f} GB, {result['experts']} experts, {len(rows)} points (keep "
              f"{[r['keep'] for r in rows]}), load {result['load_seconds']:.1f} s, peak RSS {result['peak_rss'] / 1e9:.2f} GB "
              f"({result['peak_rss'] / size:.2f}x the checkpoint); load average {min(loads):.1f}-{max(loads):.1f}")
        print(f"  per point (median): mask {summary['mask']:.1f} s; reload {summary['reload']:.1f} s (load + prune "
              f"{summary['reload_load']:.1f} s); stream {summary['stream']:.1f} s (streaming prune + load "
              f"{summary['stream_load']:.1f} s)")
        print(f"  over the sweep: reload / mask {totals['reload'] / totals['mask']:.2f}x, stream / mask "
              f"{totals['stream'] / totals['mask']:.2f}x; same accuracies every way at every point: "
              f"{all(r['same'] for r in rows)}; answer loss and perplexity differ by at most "
              f"{max(max(r['loss_difference'], r['perplexity_difference']) for r in rows):.1e} (relative)", flush=True)
        save_results("sweep", report)
        if not args.keep_checkpoints:
            remove(source)


if __name__ == "__main__":
    main()
