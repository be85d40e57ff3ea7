"""Cost of attribution: collecting statistics over batches / a plain forward over the same batches.

A randomly initialised Qwen3-MoE of realistic shape for a CPU machine (8 MoE layers,
32 experts, top-4). Over the same batches, interleaved and repeated, it times:

- plain: ``model(**inputs)`` under no_grad;
- routing: ``collect_attribution`` for frequency / gate mass (+ co-activation);
- reap: the same plus expert output norms of the routed pairs (REAP and EAN);
- dense: a plain forward plus every expert run on every token (what REAP would cost
  without routed-only expert outputs), for comparison.

Ratios are of medians over the interleaved repeats. Targets: routing <= 1.05, reap <= 2.0.

    python benchmarks/bench_attribution.py [--repeats 5] [--batches 2] [--family qwen3_moe]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_capture import timed

from moeguard.attribution import collect_attribution
from moeguard.attribution.collect import StatisticsAccumulator, example_parts
from moeguard.attribution.statistics import output_norms
from moeguard.models.random_init import random_moe

# A realistic shape for a 2-core CPU machine (about 108M parameters for Qwen3-MoE).
SHAPE = dict(layers=8, experts=32, top_k=4, hidden=512, intermediate=256, vocab=1024, heads=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen3_moe")
    parser.add_argument("--batch", type=int, default=4, help="examples per batch")
    parser.add_argument("--seq", type=int, default=256, help="tokens per example")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 gives steadier ratios on a machine shared with other work)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    moe = random_moe(args.family, **SHAPE)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for number in range(args.batches):
        input_ids = torch.randint(3, 1024, (args.batch, args.seq), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[: args.batch // 2, -args.seq // 4 :] = 0  # right padding on half the rows
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask,
                        "example_index": torch.arange(number * args.batch, (number + 1) * args.batch)})

    def plain_one(b) -> None:
        with torch.no_grad():
            moe.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    def plain() -> None:
        for b in batches:
            plain_one(b)

    def routing() -> None:
        collect_attribution(moe, batches, criteria=["frequency", "gate_mass"], progress=False)

    def reap() -> None:
        collect_attribution(moe, batches, criteria=["reap", "ean"], progress=False)

    def dense() -> None:
        def every_expert(event) -> None:
            n, experts = event.hidden_states.shape[0], event.layer.num_experts
            all_experts = torch.arange(experts).expand(n, experts)
            output_norms(moe.expert_outputs(event.layer.index, event.hidden_states, all_experts))

        with torch.no_grad(), moe.capture_routing(keep=False, on_route=every_expert) as capture:
            for b in batches:
                capture.selection = b["attention_mask"].bool()
                moe.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    variants = {"plain": plain, "routing": routing, "reap": reap, "dense": dense}
    for fn in variants.values():  # warm-up (also fills the model's fingerprint cache)
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))

    # The statistics alone, replayed on recorded routing events: their share of a plain forward.
    events = []
    with torch.no_grad(), moe.capture_routing(keep=False, on_route=events.append):
        moe.model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    replay = {}
    for norms in (False, True):
        accumulator = StatisticsAccumulator(moe, norms=norms, ablation=False)
        accumulator.row_part = example_parts(batches[0], 0)
        with torch.no_grad():
            replay[norms] = statistics.median(
                timed(lambda: [accumulator.on_route(event) for event in events])[1] for _ in range(args.repeats)
            )
    one_forward = statistics.median(timed(lambda: plain_one(batches[0]))[1] for _ in range(args.repeats))

    counts = moe.parameter_counts()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"model: {args.family}, {SHAPE['layers']} MoE layers x {SHAPE['experts']} experts, top-{SHAPE['top_k']}, "
          f"hidden {SHAPE['hidden']}, {counts.total / 1e6:.1f}M parameters; {args.batches} batches of {args.batch} x {args.seq} "
          f"({tokens} non-pad tokens); {args.repeats} interleaved repeats")
    targets = {"routing": "target <= 1.05", "reap": "target <= 2.0", "dense": "for comparison"}
    for label, column in (("wall", 0), ("process CPU", 1)):
        base = statistics.median(t[column] for t in times["plain"])
        cells = [f"plain {base * 1000:.0f} ms"]
        for name, target in targets.items():
            median = statistics.median(t[column] for t in times[name])
            cells.append(f"{name} {median / base:.3f} ({target})")
        print(f"{label:>12}: " + ", ".join(cells))
    print(f"statistics alone (process CPU, replayed on one batch's routing events): routing "
          f"{replay[False] * 1000:.1f} ms = {replay[False] / one_forward:.2%} of a plain forward, with output norms "
          f"{replay[True] * 1000:.1f} ms = {replay[True] / one_forward:.2%}")


if __name__ == "__main__":
    main()
