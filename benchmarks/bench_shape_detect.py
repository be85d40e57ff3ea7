"""Derivative detection at real shapes: time and memory of one comparison, and where its time goes.

For each shape a random real-shape checkpoint (bf16) is pruned to half its experts by
the streaming prune, and ``moeguard.forensics.detect`` compares the pruned copy with
its parent (default settings: 128 probes, 64 permutations, 256 weight rows), in a
fresh process, ``--repeats`` times. The parts are timed by wrapping detect's own
functions: the per-layer signatures (expert responses to the probes, weight rows,
router rows), the similarity and evidence matrices under every permutation, and the
linear assignments (one per permutation and layer pair, ``O(E^3)`` each). Peak memory
is the rise of the process's RSS during the comparison (both models already loaded),
and the peak RSS of the whole process against the two checkpoints.

    python benchmarks/bench_shape_detect.py --workdir /tmp/shapes [--shapes qwen3-30b-a3b,deepseek-v3-narrow]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shapes import (
    PartTimer,
    carve,
    case_checkpoints,
    current_rss,
    directory_bytes,
    emit,
    load_average,
    median,
    new_report,
    peak_rss,
    remove,
    reset_peak_rss,
    run_child,
    save_results,
    shape_parser,
)

CASES = {
    "qwen3-30b-a3b": ("qwen3-30b-a3b", 2, {}),
    # 256 experts in 8 groups at DeepSeek-V3's hidden width; experts 8x narrower and a 32k vocabulary so that
    # parent and suspect fit the memory budget together.
    "deepseek-v3-narrow": ("deepseek-v3", 1, {"moe_intermediate_size": 256, "vocab_size": 32000}),
}


def child(args: argparse.Namespace) -> None:
    from moeguard.forensics.detect import detect
    from moeguard.models import load_moe

    parent, suspect = load_moe(args.source), load_moe(args.suspect)
    parent.fingerprint(), suspect.fingerprint()  # cached: the comparisons below do not hash the weights again
    timer = PartTimer()
    timer.wrap_detect()
    runs = []
    for _ in range(args.repeats):
        timer.seconds.clear()
        before = current_rss()
        reset_peak_rss()
        start, cpu = time.perf_counter(), time.process_time()
        verdict = detect(parent, suspect, progress=False)
        runs.append({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                     "rise": peak_rss() - before, "parts": dict(timer.seconds), "status": verdict.status, "z": verdict.z})
    emit({"runs": runs, "experts": parent.num_experts[0], "suspect_experts": suspect.num_experts[0],
          "layers": parent.num_layers, "hidden": parent.config.hidden_size})


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0], CASES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--suspect", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    report = new_report(args)
    for name, shape, layers, settings, source in case_checkpoints(args, CASES):
        suspect = source.parent / f"{source.name}-half"
        carve(source, suspect, 1 / 2)
        loads = [load_average()]
        result = run_child(Path(__file__).resolve(), ["--source", str(source), "--suspect", str(suspect),
                                                      "--repeats", str(args.repeats)])
        loads.append(load_average())
        runs = result["runs"]
        parts = {label: median(r["parts"].get(label, 0.0) for r in runs) for label in ("signatures", "comparison", "assignment")}
        seconds = median(r["seconds"] for r in runs)
        sizes = directory_bytes(source) + directory_bytes(suspect)
        report["cases"][name] = {"shape": shape, "moe_layers": layers, "settings": settings, "result": result,
                                 "seconds": seconds, "parts": parts, "checkpoints_bytes": sizes, "load_average": loads}
        print(f"{name}: {result['experts']} vs {result['suspect_experts']} experts, {result['layers']} MoE layers, hidden "
              f"{result['hidden']}; {runs[0]['status']} (z {runs[0]['z']:.1f}); per comparison {seconds:.1f} s "
              f"(CPU {median(r['cpu_seconds'] for r in runs):.1f} s): signatures {parts['signatures']:.1f} s, similarity "
              f"and evidence {parts['comparison'] - parts['assignment']:.1f} s, assignments {parts['assignment']:.2f} s; "
              f"memory rise {median(r['rise'] for r in runs) / 1e9:.2f} GB, process peak {result['peak_rss'] / 1e9:.2f} GB "
              f"({result['peak_rss'] / sizes:.2f}x both checkpoints); load average {min(loads):.1f}-{max(loads):.1f}",
              flush=True)
        save_results("detect", report)
        remove(suspect)
        if not args.keep_checkpoints:
            remove(source)


if __name__ == "__main__":
    main()
