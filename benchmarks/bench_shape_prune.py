"""Streaming prune at real shapes: disk throughput against the disk's own bandwidth, peak memory against the largest shard.

For each shape a random checkpoint laid out like the released one (``real_shapes.py``:
bf16, per-expert tensors, shards of the release's size) is pruned by
``moeguard.pruning.streaming.streaming_prune`` to 1/2 and 1/8 of its experts (Mixtral:
4 and 2 of 8, since top-2 forbids 1), each run in a fresh process with the input
files dropped from the page cache first (``posix_fadvise(DONTNEED)``, checked with
``mincore``), so every byte is read from the disk. Interleaved with the prunes, the
same run measures the disk: a plain sequential read of the checkpoint (16 MB blocks,
cold) and a sequential write of 4 GB with fsync. A prune's time includes making its
output durable (fsync of every written file; the code before this change did not
fsync, so the benchmark does it after the call).

The ratio to the physical limit is ``(R / read_bw + W / write_bw) / seconds``: the
time the disk needs to read R and write W bytes at the bandwidths measured in the
same run, over the time the prune took (1.0 = disk-bound). Peak memory is the child's
VmHWM, against the largest shard. ``--before SRC`` adds the same prunes run by
another source tree (e.g. ``git archive main src`` unpacked) for before/after figures.

    python benchmarks/bench_shape_prune.py --workdir /tmp/shapes [--shapes qwen3-30b-a3b,...] [--repeats 3] [--before DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shapes import (
    cached_fraction,
    checkpoint,
    directory_bytes,
    drop_cached,
    emit,
    largest_file,
    load_average,
    machine,
    median,
    remove,
    run_child,
    save_results,
    sequential_read,
    sequential_write,
    shape_parser,
)

# shape -> (MoE layers, vocabulary override, keep counts); sizes chosen to be several GB and fit ~40 GB of disk
# with one output beside the input.
PLANS = {
    "qwen3-30b-a3b": (8, None, (64, 16)),
    "mixtral-8x7b": (4, None, (4, 2)),
    "olmoe-1b-7b": (16, None, (32, 8)),
    "deepseek-v3": (1, 32000, (128, 32)),
}
WRITE_TEST_BYTES = 4 << 30


def child(args: argparse.Namespace) -> None:
    import os

    from moeguard.pruning.streaming import load_meta_moe, streaming_prune

    source = Path(args.source)
    meta = load_meta_moe(source)
    if args.mode == "baseline":
        emit({"mode": "baseline"})
        return
    out = Path(args.out)
    plan = {}
    for layer in meta.layers:
        stride = layer.num_experts // args.keep
        plan[layer.index] = [i * stride for i in range(args.keep)]  # evenly spread: balanced over expert groups
    start, cpu = time.perf_counter(), time.process_time()
    streaming_prune(source, plan, out, progress=False)
    for path in sorted(out.glob("*.safetensors")):  # durable, as the prune after this change makes it itself
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - start
    emit({"mode": "prune", "seconds": seconds, "cpu_seconds": time.process_time() - cpu, "read": directory_bytes(source),
          "written": directory_bytes(out)})


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0], PLANS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default=None, help="source tree of the code before the change, measured beside it")
    parser.add_argument("--before-repeats", type=int, default=None, help="repeats of the code before (default: --repeats)")
    parser.add_argument("--moe-layers", type=int, default=None, help="override the MoE layers of every shape (a quick check)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve()
    versions = {"after": None} | ({"before": Path(args.before) / "src" if (Path(args.before) / "src").is_dir()
                                   else Path(args.before)} if args.before else {})
    report = {"machine": machine(), "shapes": {}}
    for shape in args.shapes.split(","):
        moe_layers, vocab, keeps = PLANS[shape]
        moe_layers = args.moe_layers or moe_layers
        source = checkpoint(workdir, shape, moe_layers=moe_layers, vocab=vocab)
        size, shard = directory_bytes(source), largest_file(source)
        shards = len(list(source.glob("*.safetensors")))
        print(f"{shape}: {moe_layers} MoE layers, {size / 1e9:.2f} GB in {shards} shards (largest {shard / 1e9:.2f} GB)",
              flush=True)
        out = workdir / "pruned"
        runs: dict[str, list] = {"read": [], "write": [], "baseline": []}
        loads = []
        for repeat in range(args.repeats):
            loads.append(load_average())
            read_bytes, read_seconds = sequential_read([source])
            runs["read"].append(read_bytes / read_seconds)
            write_bytes, write_seconds = sequential_write(workdir / "write-test.bin", WRITE_TEST_BYTES)
            runs["write"].append(write_bytes / write_seconds)
            runs["baseline"].append(run_child(script, ["--mode", "baseline", "--source", str(source)])["peak_rss"])
            for version, src in versions.items():
                if version == "before" and repeat >= (args.before_repeats or args.repeats):
                    continue
                for keep in keeps:
                    remove(out)
                    drop_cached([source])
                    cold = cached_fraction([source])
                    result = run_child(script, ["--mode", "prune", "--source", str(source), "--out", str(out),
                                                "--keep", str(keep)], src=src)
                    result["cached_before"] = cold
                    runs.setdefault(f"{version} keep {keep}", []).append(result)
                    print(f"  repeat {repeat}: {version} keep {keep}: {result['seconds']:.1f} s ({result['cpu_seconds']:.1f} s "
                          f"CPU), peak "
                          f"{result['peak_rss'] / 1e9:.2f} GB (cached before: {cold:.1%}); disk read "
                          f"{runs['read'][-1] / 1e9:.2f} GB/s, write {runs['write'][-1] / 1e9:.2f} GB/s", flush=True)
                    remove(out)
        read_bw, write_bw, baseline = median(runs["read"]), median(runs["write"]), median(runs["baseline"])
        rows = []
        for version in versions:
            for keep in keeps:
                results = runs[f"{version} keep {keep}"]
                bound = [r["read"] / read_bw + r["written"] / write_bw for r in results]
                ratios = [b / r["seconds"] for b, r in zip(bound, results)]
                rows.append({
                    "version": version, "keep": keep, "experts": None, "read": results[0]["read"],
                    "written": results[0]["written"], "seconds": median(r["seconds"] for r in results),
                    "throughput": median((r["read"] + r["written"]) / r["seconds"] for r in results),
                    "disk_bound_seconds": median(bound), "ratio_to_disk": median(ratios),
                    "cpu_seconds": median(r["cpu_seconds"] for r in results),
                    "peak_rss": median(r["peak_rss"] for r in results),
                    "peak_over_largest_shard": median(r["peak_rss"] for r in results) / shard,
                    "above_baseline_over_largest_shard": (median(r["peak_rss"] for r in results) - baseline) / shard,
                })
        report["shapes"][shape] = {"moe_layers": moe_layers, "vocab": vocab, "checkpoint_bytes": size,
                                   "shards": shards, "largest_shard": shard, "read_bandwidth": read_bw,
                                   "write_bandwidth": write_bw, "baseline_rss": baseline, "load_average": loads,
                                   "rows": rows, "runs": runs}
        print(f"  disk: read {read_bw / 1e9:.2f} GB/s, write {write_bw / 1e9:.2f} GB/s (medians); baseline process "
              f"{baseline / 1e6:.0f} MB; load average {min(loads):.1f}-{max(loads):.1f}")
        print(f"  {'version':<7} {'keep':>5} {'read GB':>8} {'written GB':>10} {'s':>7} {'CPU s':>6} {'GB/s':>6} "
              f"{'/ disk':>7} {'peak GB':>8} {'/ shard':>8}")
        for row in rows:
            print(f"  {row['version']:<7} {row['keep']:>5} {row['read'] / 1e9:>8.2f} {row['written'] / 1e9:>10.2f} "
                  f"{row['seconds']:>7.1f} {row['cpu_seconds']:>6.1f} {row['throughput'] / 1e9:>6.2f} {row['ratio_to_disk']:>7.2f} "
                  f"{row['peak_rss'] / 1e9:>8.2f} {row['peak_over_largest_shard']:>8.2f}", flush=True)
        save_results("prune", report)
        if not args.keep_checkpoints:
            remove(source)


if __name__ == "__main__":
    main()
