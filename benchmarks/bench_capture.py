"""Overhead of routing capture: forward with ``capture_routing`` / plain forward.

A randomly initialised Qwen3-MoE of realistic shape for a CPU machine (8 MoE layers,
32 experts, top-4); plain and capturing forwards are interleaved and the ratio of
their medians is reported. Target: <= 1.05.

    python benchmarks/bench_capture.py [--repeats 15] [--family qwen3_moe]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moeguard.models.random_init import random_moe


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CPU time is less disturbed by other processes."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen3_moe")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    moe = random_moe(
        args.family, layers=args.layers, experts=args.experts, top_k=args.top_k, hidden=args.hidden,
        intermediate=args.intermediate, vocab=1024, heads=8,
    )
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 1024, (args.batch, args.seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: args.batch // 2, : args.seq // 4] = 0  # left padding on half the rows

    def plain() -> None:
        moe.model(input_ids=input_ids, attention_mask=attention_mask)

    def captured() -> None:
        with moe.capture_routing() as capture:
            moe.model(input_ids=input_ids, attention_mask=attention_mask)
        assert capture.num_tokens(0) == int(attention_mask.sum())

    with torch.no_grad():
        for _ in range(2):  # warm-up
            plain()
            captured()
        plain_times, capture_times = [], []
        for _ in range(args.repeats):
            plain_times.append(timed(plain))
            capture_times.append(timed(captured))

        # The hooks alone, on the same routing tensors: their share of a forward pass.
        with moe.capture_routing() as capture:
            hook_inputs = {}
            handles = [
                layer.experts.register_forward_pre_hook(
                    lambda m, a, k, i=layer.index: hook_inputs.setdefault(i, (a, k)), with_kwargs=True
                )
                for layer in moe.layers
            ]
            moe.model(input_ids=input_ids, attention_mask=attention_mask)
            for handle in handles:
                handle.remove()
            hooks = [capture._experts_pre_hook(layer) for layer in moe.layers]
            start = time.perf_counter()
            for _ in range(args.repeats):
                for layer, hook in zip(moe.layers, hooks):
                    hook(layer.experts, *hook_inputs[layer.index])
            hook_seconds = (time.perf_counter() - start) / args.repeats

    counts = moe.parameter_counts()
    print(f"model: {args.family}, {args.layers} MoE layers x {args.experts} experts, top-{args.top_k}, "
          f"hidden {args.hidden}, {counts.total / 1e6:.1f}M parameters; batch {args.batch} x {args.seq} tokens")
    for label, column in (("wall", 0), ("process CPU", 1)):
        plain_median = statistics.median(t[column] for t in plain_times)
        capture_median = statistics.median(t[column] for t in capture_times)
        print(f"{label:>12} time: plain median {plain_median * 1000:.1f} ms, capture median "
              f"{capture_median * 1000:.1f} ms over {args.repeats} interleaved runs -> ratio "
              f"{capture_median / plain_median:.3f} (target <= 1.05)")
    plain_wall = statistics.median(t[0] for t in plain_times)
    print(f"capture hooks alone: {hook_seconds * 1000:.2f} ms per forward = {hook_seconds / plain_wall:.2%} of a plain forward")


if __name__ == "__main__":
    main()
