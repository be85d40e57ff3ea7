"""Write random checkpoints with the exact layer shapes of released MoE models (or their small versions).

Each checkpoint is a stock transformers model directory: the released model's config
with fewer decoder layers, random bf16 weights stored as the released checkpoint
stores them (per-expert tensors, shards of its shard size, an index), a generation
config and moeguard's character tokenizer, so every command runs on it and it loads
with ``AutoModelForCausalLM.from_pretrained``. Nothing is claimed about accuracy:
these checkpoints measure throughput, memory and scaling. Writing holds one tensor
in memory at a time (:func:`moeguard.models.random_init.write_random_checkpoint`).

    python benchmarks/real_shapes.py list
    python benchmarks/real_shapes.py write qwen3-30b-a3b --moe-layers 2 --out /tmp/qwen3-2l
    python benchmarks/real_shapes.py write deepseek-v3 --moe-layers 1 --vocab 32000 --out /tmp/dsv3-1l
    python benchmarks/real_shapes.py write olmoe-1b-7b --small --moe-layers 2 --out /tmp/olmoe-small
    python benchmarks/real_shapes.py write deepseek-v3 --moe-layers 1 --set moe_intermediate_size=256 --out /tmp/dsv3-narrow
"""

from __future__ import annotations

import argparse
import json

import torch

from moeguard.models.random_init import REAL_SHAPES, real_shape_config, stored_layout, write_random_checkpoint


def layout_bytes(config, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """(total bytes, bytes of one MoE layer's routed experts, bytes of everything outside the decoder layers)."""
    layout = stored_layout(config, dtype)
    size = {name: t.numel() * t.element_size() for name, t in layout.items()}
    layers = [n for n in size if ".layers." in n]
    outside = sum(v for n, v in size.items() if n not in layers)
    first_moe = max(int(n.split(".layers.")[1].split(".")[0]) for n in layers)
    experts = sum(v for n, v in size.items() if f".layers.{first_moe}." in n and ".experts." in n)
    return sum(size.values()), experts, outside


def describe(name: str) -> str:
    shape = REAL_SHAPES[name]
    config = real_shape_config(name, moe_layers=1)
    total, experts, outside = layout_bytes(config)
    layer = total - outside
    released = outside + shape.layers * layer  # dense layers counted as MoE ones: an upper bound
    return (f"{name:<15} {shape.hub_id:<30} {shape.family:<12} one MoE layer {layer / 1e9:6.2f} GB "
            f"(routed experts {experts / 1e9:.2f} GB), embeddings + head {outside / 1e9:.2f} GB, "
            f"{shape.layers} layers in the release (~{released / 1e9:.0f} GB), shards of {shape.max_shard_size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the shapes, with the size of one layer in bf16")
    write = commands.add_parser("write", help="write one checkpoint")
    write.add_argument("shape", choices=list(REAL_SHAPES))
    write.add_argument("--moe-layers", type=int, default=2, help="MoE decoder layers (default 2)")
    write.add_argument("--dense-layers", type=int, default=0, help="leading dense layers (DeepSeek-V3 only)")
    write.add_argument("--small", action="store_true", help="the small version (same experts, top-k, groups; tiny widths)")
    write.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the released model's)")
    write.add_argument("--shard-size", default=None, help="maximum shard size (default: the released checkpoint's)")
    write.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="another config value (JSON), e.g. moe_intermediate_size=256 for narrower experts")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--out", required=True)
    write.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    if args.command == "list":
        for name in REAL_SHAPES:
            print(describe(name))
        return
    from moeguard.data import build_char_tokenizer

    overrides = {"vocab_size": args.vocab} if args.vocab else {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    config = real_shape_config(args.shape, moe_layers=args.moe_layers, dense_layers=args.dense_layers, small=args.small,
                               **overrides)
    shard_size = args.shard_size or ("200KB" if args.small else REAL_SHAPES[args.shape].max_shard_size)
    written = write_random_checkpoint(config, args.out, max_shard_size=shard_size, tokenizer=build_char_tokenizer(),
                                      seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {written.path}: {written.parameters / 1e9:.2f}B parameters, {written.total_bytes / 1e9:.2f} GB in "
          f"{len(written.shard_bytes)} shards (largest {written.largest_shard / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
