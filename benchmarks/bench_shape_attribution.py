"""Attribution at real shapes: time per token against a plain forward, peak memory against the checkpoint.

Each shape's random checkpoint (``real_shapes.py``, bf16, laid out like the release)
is measured in fresh processes:

- ``timing``: the model loaded in bf16; over the same batches of a built-in task
  (``--examples`` examples, ``--batch-size`` per batch), interleaved ``--repeats``
  times after a warm-up: a plain no-grad forward (``model(**inputs)``: logits at every
  position), the same forward computing the last position's logits only (what routing
  needs), ``collect_attribution`` for routing frequency, and for REAP (expert output
  norms). Ratios are of medians, against both forwards. The fixed costs a command
  adds once (loading, the weights fingerprint, the checkpoint fingerprint) are timed
  once beside them.
- ``command``: ``moeguard attribute --task T --samples N --criteria frequency,reap``
  as a user runs it (default dtype, every fixed cost included); its peak RSS (VmHWM)
  against the checkpoint's size on disk.

``--before SRC`` runs both with another source tree (e.g. ``git archive main src``
unpacked) for before/after figures; ``--offload`` adds a model that does not fit the
memory budget, loaded with ``--device-map auto --max-memory cpu=...`` (weights beyond
the budget offloaded to disk).

    python benchmarks/bench_shape_attribution.py --workdir /tmp/shapes [--shapes ...] [--before DIR] [--offload]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from shapes import (
    checkpoint,
    directory_bytes,
    emit,
    load_average,
    machine,
    remove,
    run_child,
    save_results,
    shape_parser,
)

# name -> (shape, MoE layers, config overrides); in-memory sizes below the ~12 GB budget (bf16).
CASES = {
    "qwen3-30b-a3b": ("qwen3-30b-a3b", 2, {}),
    "olmoe-1b-7b": ("olmoe-1b-7b", 4, {}),
    "mixtral-8x7b": ("mixtral-8x7b", 2, {}),
    # One DeepSeek-V3 layer is 23 GB: its 256 experts in 8 groups, hidden 7168, with experts 8x narrower.
    "deepseek-v3-narrow": ("deepseek-v3", 1, {"moe_intermediate_size": 256}),
}
# A model beyond the budget (12.1 GB), attributed with its weights partly offloaded to disk.
OFFLOAD = ("mixtral-8x7b", 4, {}, "cpu=6GiB")


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def child_timing(args: argparse.Namespace) -> None:
    import torch

    from moeguard.attribution import collect_attribution
    from moeguard.data import batches, load_task
    from moeguard.data.batching import context_length
    from moeguard.models.fingerprint import checkpoint_fingerprint
    from moeguard.models.options import LoadOptions

    options = {"dtype": "bfloat16"}
    if args.max_memory:
        options.update(device_map="auto", max_memory=args.max_memory)
    fixed = {}
    start = time.perf_counter()
    moe = LoadOptions(**options).load(args.source)
    fixed["load"] = time.perf_counter() - start
    fixed["fingerprint"] = timed(moe.fingerprint)[0]
    fixed["checkpoint_fingerprint"] = timed(lambda: checkpoint_fingerprint(args.source))[0]
    moe.source = None  # the timed collections below skip the checkpoint fingerprint (timed once above)
    data = load_task(args.task, "train", limit=args.examples)
    encoded = list(batches(moe.tokenizer, data, batch_size=args.batch_size, context=context_length(moe)))
    tokens = sum(int(b["attention_mask"].sum()) for b in encoded)

    def forward(**extra):
        def run():
            with torch.no_grad():
                for b in encoded:
                    moe.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **extra)
        return run

    variants = {
        "plain": forward(),
        "plain_last_logits": forward(logits_to_keep=1),
        "frequency": lambda: collect_attribution(moe, encoded, criteria=["frequency"], progress=False),
        "reap": lambda: collect_attribution(moe, encoded, criteria=["reap"], progress=False),
    }
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    emit({"mode": "timing", "tokens": tokens, "batches": len(encoded), "fixed": fixed, "times": times,
          "parameters": sum(p.numel() for p in moe.model.parameters()), "experts": moe.num_experts[0],
          "top_k": moe.top_k[0], "layers": moe.num_layers, "dtype": str(next(moe.model.parameters()).dtype)})


def child_command(args: argparse.Namespace) -> None:
    from moeguard.cli import main

    out = Path(args.out)
    command = ["--quiet", "attribute", "--model", args.source, "--task", args.task, "--samples", str(args.examples),
               "--batch-size", str(args.batch_size), "--criteria", "frequency,reap", "--out", str(out), "--overwrite"]
    if args.max_memory:
        command += ["--device-map", "auto", "--max-memory", args.max_memory]
    start = time.perf_counter()
    status = main(command)
    emit({"mode": "command", "status": status, "seconds": time.perf_counter() - start})


def summarise(timing: dict) -> dict:
    medians = {name: [statistics.median(t[i] for t in values) for i in (0, 1)] for name, values in timing["times"].items()}
    tokens = timing["tokens"]
    row = {"tokens": tokens, "fixed": timing["fixed"], "dtype": timing["dtype"],
           "plain_ms_per_token": medians["plain"][0] / tokens * 1e3,
           "plain_last_ms_per_token": medians["plain_last_logits"][0] / tokens * 1e3}
    for name in ("frequency", "reap"):
        row[f"{name}_ms_per_token"] = medians[name][0] / tokens * 1e3
        row[f"{name}_vs_plain"] = medians[name][0] / medians["plain"][0]
        row[f"{name}_vs_plain_last"] = medians[name][0] / medians["plain_last_logits"][0]
        row[f"{name}_vs_plain_last_cpu"] = medians[name][1] / medians["plain_last_logits"][1]
    return row


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0], CASES)
    parser.add_argument("--task", default="reverse")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default=None, help="source tree of the code before the change, measured beside it")
    parser.add_argument("--before-shapes", default="qwen3-30b-a3b-1l",
                        help="cases the code before is run on (its float32 default needs about 4x the checkpoint)")
    parser.add_argument("--offload", action="store_true", help="also a model beyond the memory budget, partly offloaded")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--max-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        (child_timing if args.mode == "timing" else child_command)(args)
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve()
    before = None
    if args.before:
        before = Path(args.before) / "src" if (Path(args.before) / "src").is_dir() else Path(args.before)
    cases = {name: CASES[name] + (None,) for name in args.shapes.split(",") if name}
    if before:
        cases["qwen3-30b-a3b-1l"] = ("qwen3-30b-a3b", 1, {}, None)  # the before/after memory comparison
    if args.offload:
        cases["mixtral-8x7b-offload"] = OFFLOAD
    common = ["--task", args.task, "--examples", str(args.examples), "--batch-size", str(args.batch_size),
              "--repeats", str(args.repeats)]
    report = {"machine": machine(), "settings": vars(args), "cases": {}}
    for name, (shape, layers, settings, max_memory) in cases.items():
        source = checkpoint(workdir, shape, moe_layers=layers, settings=settings)
        size = directory_bytes(source)
        extra = ["--max-memory", max_memory] if max_memory else []
        entry: dict = {"shape": shape, "moe_layers": layers, "settings": settings, "max_memory": max_memory,
                       "checkpoint_bytes": size, "load_average": [load_average()]}
        versions = {"after": None} | ({"before": before} if before and name in args.before_shapes.split(",") else {})
        for version, src in versions.items():
            out = workdir / "attribution.json"
            command = run_child(script, ["--mode", "command", "--source", str(source), "--out", str(out), *common, *extra],
                                src=src)
            remove(out)
            out.with_suffix(".safetensors").unlink(missing_ok=True)
            timing = run_child(script, ["--mode", "timing", "--source", str(source), *common, *extra], src=src)
            entry[version] = {"command": command, "timing": timing, "summary": summarise(timing)}
            entry["load_average"].append(load_average())
            row = entry[version]["summary"]
            print(f"{name} ({version}): checkpoint {size / 1e9:.2f} GB, {timing['experts']} experts top-{timing['top_k']}, "
                  f"{timing['layers']} MoE layers; {row['tokens']} tokens in {timing['batches']} batches\n"
                  f"  command: {command['seconds']:.1f} s, peak RSS {command['peak_rss'] / 1e9:.2f} GB = "
                  f"{command['peak_rss'] / size:.2f}x the checkpoint\n"
                  f"  plain forward {row['plain_ms_per_token']:.2f} ms/token ({row['plain_last_ms_per_token']:.2f} with "
                  f"last-position logits); frequency {row['frequency_vs_plain']:.3f}x plain, "
                  f"{row['frequency_vs_plain_last']:.3f}x last-logits; REAP {row['reap_vs_plain']:.3f}x plain, "
                  f"{row['reap_vs_plain_last']:.3f}x last-logits (CPU {row['reap_vs_plain_last_cpu']:.3f}); fixed: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in row["fixed"].items()), flush=True)
        report["cases"][name] = entry
        save_results("attribution", report)
        if not args.keep_checkpoints:
            remove(source)
    print(json.dumps({"load_average": load_average()}))


if __name__ == "__main__":
    main()
