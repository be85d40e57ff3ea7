"""Re-alignment at real shapes: tokens per second of a training step in each scope against a plain step.

The attacker re-aligns a carved model: each shape's random checkpoint (bf16) is
pruned by the streaming prune to 1/8 of its experts (DeepSeek-V3: 1/8 of each group)
and loaded as stored. In fresh processes, interleaved over ``--repeats`` rounds, each
variant runs one warm-up step and then ``--steps`` timed steps on batches of a
built-in task (``--batch-size`` examples, the answer tokens labelled):

- plain: a hand-written step over every parameter (forward, token cross-entropy,
  backward, AdamW step), no moeguard code;
- ``moeguard.training.train`` (the loop re-alignment uses) in each scope of
  ``moeguard.realign.scopes.TRAIN_SCOPES``: router, experts, attention, all, lora.

Throughput is non-pad tokens per second; the ratio is against the plain
step; peak RSS per variant (its own process) against the pruned checkpoint. The
learning rate is tiny so the timed steps do not change the numbers they run on.

    python benchmarks/bench_shape_realign.py --workdir /tmp/shapes [--shapes qwen3-30b-a3b,...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shapes import (
    carve,
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
    "olmoe-1b-7b": ("olmoe-1b-7b", 4, {}),
    "deepseek-v3-narrow": ("deepseek-v3", 1, {"moe_intermediate_size": 256}),
    "mixtral-8x7b": ("mixtral-8x7b", 4, {}),
}
VARIANTS = ("plain", "router", "experts", "attention", "all", "lora")
LR = 1e-7


def child(args: argparse.Namespace) -> None:
    import torch

    from moeguard.data import batches, load_task, model_inputs
    from moeguard.models import load_moe
    from moeguard.realign.scopes import add_lora, scope_parameters
    from moeguard.training import token_cross_entropy, train

    moe = load_moe(args.source)
    data = load_task(args.task, "train", limit=args.batch_size * (args.steps + 1))
    encoded = list(batches(moe.tokenizer, data, batch_size=args.batch_size))
    tokens = [int(b["attention_mask"].sum()) for b in encoded]
    lm = moe.model
    if args.variant == "plain":
        optimizer = torch.optim.AdamW(lm.parameters(), lr=LR)
        lm.train()

        def step(batch) -> None:
            loss = token_cross_entropy(lm(**model_inputs(batch)).logits, batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step(encoded[0])
        start, cpu = time.perf_counter(), time.process_time()
        for batch in encoded[1:]:
            step(batch)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    else:
        if args.variant == "lora":
            adapters = add_lora(moe)
            parameters = list(adapters.parameters.values())
        else:
            parameters = list(scope_parameters(moe, args.variant).values())
        train(moe, encoded[:1], steps=1, lr=LR, parameters=parameters, progress=False)  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        train(moe, encoded[1:], steps=len(encoded) - 1, lr=LR, parameters=parameters, progress=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    trained = sum(p.numel() for p in (lm.parameters() if args.variant == "plain" else parameters))
    emit({"variant": args.variant, "seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": sum(tokens[1:]),
          "steps": len(encoded) - 1, "trained_parameters": trained, "parameters": sum(p.numel() for p in lm.parameters()),
          "experts": moe.num_experts[0]})


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0], CASES)
    parser.add_argument("--task", default="reverse")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    report = new_report(args)
    for name, shape, layers, settings, source in case_checkpoints(args, CASES):
        pruned = source.parent / f"{source.name}-eighth"
        keep, experts = carve(source, pruned, 1 / 8)
        size = directory_bytes(pruned)
        runs: dict[str, list] = {variant: [] for variant in VARIANTS}
        loads = [load_average()]
        for _ in range(args.repeats):
            for variant in VARIANTS:
                runs[variant].append(run_child(Path(__file__).resolve(), [
                    "--source", str(pruned), "--variant", variant, "--task", args.task, "--batch-size",
                    str(args.batch_size), "--steps", str(args.steps)]))
            loads.append(load_average())
        plain = median(r["tokens"] / r["seconds"] for r in runs["plain"])
        rows = []
        for variant in VARIANTS:
            results = runs[variant]
            throughput = median(r["tokens"] / r["seconds"] for r in results)
            rows.append({"variant": variant, "tokens_per_second": throughput, "ratio_to_plain": throughput / plain,
                         "cpu_seconds_per_step": median(r["cpu_seconds"] / r["steps"] for r in results),
                         "trained_parameters": results[0]["trained_parameters"],
                         "peak_rss": median(r["peak_rss"] for r in results)})
        report["cases"][name] = {"shape": shape, "moe_layers": layers, "settings": settings, "kept_experts": keep,
                                 "pruned_bytes": size, "rows": rows, "runs": runs, "load_average": loads}
        print(f"{name}: carved to {keep} of {experts} experts ({size / 1e9:.2f} GB); batches of "
              f"{args.batch_size} x ~{runs['plain'][0]['tokens'] // (args.batch_size * args.steps)} tokens; load average "
              f"{min(loads):.1f}-{max(loads):.1f}")
        print(f"  {'scope':<10} {'tokens/s':>9} {'/ plain':>8} {'trained params':>15} {'peak GB':>8} {'/ model':>8}")
        for row in rows:
            print(f"  {row['variant']:<10} {row['tokens_per_second']:>9.1f} {row['ratio_to_plain']:>8.2f} "
                  f"{row['trained_parameters'] / 1e6:>14.1f}M {row['peak_rss'] / 1e9:>8.2f} {row['peak_rss'] / size:>8.2f}",
                  flush=True)
        save_results("realign", report)
        remove(pruned)
        if not args.keep_checkpoints:
            remove(source)


if __name__ == "__main__":
    main()
