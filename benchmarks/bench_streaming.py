"""Peak memory of the streaming prune vs the in-memory prune, as ratios to the checkpoint size.

Builds a randomly initialised Qwen3-MoE checkpoint of >= 2 GB (float32, sharded by
save_pretrained), then prunes it to half its experts in fresh subprocesses, each
measured once per repeat (interleaved): the streaming prune (shard by shard,
``streaming_prune``) and the in-memory prune (``load_moe`` + ``MoEModel.prune`` +
``save``). Peak RSS is the child's ``VmHWM`` (``ru_maxrss`` is not used: Linux
carries it across exec from the parent). A baseline child imports the same modules
and builds the model on the meta device (no weights): the interpreter's and
transformers' own share, which both ways pay. The checkpoint is built in a child as
well, and it and the outputs are deleted afterwards.

    python benchmarks/bench_streaming.py [--layers 12] [--shard-size 200MB] [--repeats 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def build_checkpoint(path: Path, layers: int, experts: int, hidden: int, intermediate: int, shard_size: str) -> int:
    """Write the random checkpoint; return its size in bytes."""
    from moeguard.models.random_init import random_moe

    moe = random_moe("qwen3_moe", layers=layers, experts=experts, top_k=2, hidden=hidden, intermediate=intermediate,
                     vocab=4096, heads=8, sharpen=False)
    moe.model.save_pretrained(path, max_shard_size=shard_size)
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def measure(mode: str, source: str, out: str, keep: int) -> dict:
    """Run one prune in this (fresh) process and report its peak RSS and wall time.

    Mode ``baseline`` imports the same modules and builds the model on the meta device, no weights.
    """
    from moeguard.models import load_moe
    from moeguard.pruning.streaming import load_meta_moe, streaming_prune

    start = time.perf_counter()
    layers = load_meta_moe(source).num_layers
    if mode != "baseline":
        plan = {layer: list(range(keep)) for layer in range(layers)}
        if mode == "streaming":
            streaming_prune(source, plan, out, progress=False)
        else:
            moe = load_moe(source, with_tokenizer=False)
            moe.prune(plan)
            moe.save(out)
    return {"mode": mode, "peak_rss": peak_rss(), "seconds": time.perf_counter() - start}


def run_child(mode: str, source: Path, out: Path, keep: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--child", mode, "--source", str(source), "--out", str(out), "--keep", str(keep)]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def largest_shard(path: Path) -> int:
    return max(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=896)
    parser.add_argument("--shard-size", default="200MB")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where to build the checkpoint (default: a temporary directory)")
    parser.add_argument("--child", choices=["build", "streaming", "in_memory", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "build":
        size = build_checkpoint(Path(args.out), args.layers, args.experts, args.hidden, args.intermediate, args.shard_size)
        print(json.dumps({"size": size}))
        return
    if args.child:
        print(json.dumps(measure(args.child, args.source, args.out, args.keep)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench_streaming.", dir=args.workdir))
    try:
        source = workdir / "checkpoint"
        started = time.perf_counter()
        build = [sys.executable, __file__, "--child", "build", "--out", str(source), "--layers", str(args.layers),
                 "--experts", str(args.experts), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                 "--shard-size", args.shard_size]
        completed = subprocess.run(build, check=True, capture_output=True, text=True)
        size = json.loads(completed.stdout.strip().splitlines()[-1])["size"]
        shard = largest_shard(source)
        print(f"checkpoint: qwen3_moe {args.layers} MoE layers x {args.experts} experts, hidden {args.hidden}, "
              f"{size / 1e9:.2f} GB in {len(list(source.glob('*.safetensors')))} shards (largest {shard / 1e6:.0f} MB), "
              f"built in {time.perf_counter() - started:.0f}s")
        if size < 2e9:
            print("warning: the checkpoint is smaller than 2 GB; raise --layers or --hidden")
        keep = args.experts // 2
        results: dict[str, list[dict]] = {"baseline": [], "streaming": [], "in_memory": []}
        for _ in range(args.repeats):
            for mode in results:
                results[mode].append(run_child(mode, source, workdir / f"out_{mode}", keep))
        base = statistics.median(r["peak_rss"] for r in results["baseline"])
        print(f"pruning to {keep} of {args.experts} experts per layer; medians of {args.repeats} fresh processes each")
        print(f"baseline (imports + model on the meta device, no weights): peak RSS {base / 1e6:.0f} MB")
        print(f"{'mode':>10} {'peak RSS':>10} {'/ checkpoint':>13} {'above baseline / checkpoint':>28} "
              f"{'above baseline / largest shard':>31} {'seconds':>8}")
        for mode in ("streaming", "in_memory"):
            peak = statistics.median(r["peak_rss"] for r in results[mode])
            seconds = statistics.median(r["seconds"] for r in results[mode])
            print(f"{mode:>10} {peak / 1e6:>8.0f}MB {peak / size:>13.3f} {(peak - base) / size:>28.3f} "
                  f"{(peak - base) / shard:>31.2f} {seconds:>8.1f}")
        streaming = statistics.median(r["peak_rss"] for r in results["streaming"])
        in_memory = statistics.median(r["peak_rss"] for r in results["in_memory"])
        print(f"streaming / in-memory peak RSS: {streaming / in_memory:.3f} "
              f"(above baseline: {(streaming - base) / (in_memory - base):.3f})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
