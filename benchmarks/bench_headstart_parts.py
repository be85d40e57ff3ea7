"""Benchmark: where the carver's head start lives.

Carve the demo model (experts chosen by attribution on the model itself), replace one
part of the carve by a fresh initialisation (the kept experts, the attention, the
embeddings and output layer, the routers, the norms), and re-align it on the full
model's answers as the head start's carve arm does; a fresh model of the carved
architecture is the reference. Each row: optimizer steps and training tokens to 90% of
the full model's accuracy (interpolated; censored at the cap), the same data order
and learning rate for every row, several seeds.

    python benchmarks/bench_headstart_parts.py --demo default --task reverse --keep 2

A part whose re-initialisation leaves the carve as fast as before carries none of the
head start; one whose re-initialisation makes it as slow as training from scratch
carries all of it. Writes ``benchmarks/results/headstart_parts/<demo>-<task>-keep<k>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from moeguard.attack import AttackTask, carve, labelled_pool, scratch_student
from moeguard.attack.curves import CurveSchedule, train_curve
from moeguard.attack.selection import select_experts
from moeguard.attack.students import carved_architecture
from moeguard.eval import evaluate
from moeguard.io import write_json
from moeguard.models import load_moe
from moeguard.realign.scopes import scope_parameters
from moeguard.zoo import TINY_DEMO, DemoConfig, demo_model_path

DEMOS = {"tiny": TINY_DEMO, "default": DemoConfig()}
PARTS = ("none", "experts", "attention", "embeddings", "router", "norms", "everything")


def part_names(moe, part: str) -> set[str]:
    """Parameter names of one part of a (carved) model, found by module role (embeddings and norms by name)."""
    named = dict(moe.model.named_parameters())
    if part == "none":
        return set()
    if part == "everything":
        return set(named)
    if part == "embeddings":
        return {name for name, p in named.items()
                if p is moe.model.get_input_embeddings().weight or p is moe.model.get_output_embeddings().weight}
    if part == "norms":
        return {name for name, p in named.items() if p.ndim == 1 and "norm" in name}
    scope = {"experts": "experts", "attention": "attention", "router": "router"}[part]
    ids = {id(p) for p in scope_parameters(moe, scope).values()}
    return {name for name, p in named.items() if id(p) in ids}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", choices=list(DEMOS), default="default")
    parser.add_argument("--model", default=None, help="a model directory instead of the demo model")
    parser.add_argument("--task", default="reverse")
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    source = args.model or demo_model_path(DEMOS[args.demo])
    moe = load_moe(source)
    schedule = CurveSchedule(batch_size=32, evaluate_every=25)
    task = AttackTask.builtin(args.task, prompts=args.max_steps * schedule.batch_size, test_size=200)
    data = labelled_pool(moe, task.prompts, args.max_steps * schedule.batch_size)
    full = evaluate(moe, None, task.test).value
    selection = select_experts(moe, "attribution", args.keep, search_data=data.head(64))
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for part in args.parts.split(","):
        costs = []
        for seed in seeds:
            student = carve(moe, selection.keep_sets())
            fresh = dict(scratch_student(carved_architecture(moe, args.keep), seed).model.named_parameters())
            with torch.no_grad():
                for name, param in student.model.named_parameters():
                    if name in part_names(student, part):
                        param.copy_(fresh[name])
            curve = train_curve(student, moe, data, task.test, target=0.9 * full, lr=args.lr, loss="logits", seed=seed,
                                max_steps=args.max_steps, schedule=schedule, arm=part)
            costs.append(curve.cost())
        reached = sum(c.reached for c in costs)
        row = {"reinitialised": part, "steps": [c.steps for c in costs], "tokens": [c.tokens for c in costs],
               "mean_steps": sum(c.steps for c in costs) / len(costs), "reached": reached, "runs": len(costs)}
        rows.append(row)
        print(f"{part:<12} steps to 90%: {row['mean_steps']:7.1f}{'' if reached == len(costs) else ' (censored: >=)'} "
              f"(seeds: {', '.join(f'{c.steps:.0f}' for c in costs)})", flush=True)
    name = f"{args.demo if not args.model else Path(args.model).name}-{args.task}-keep{args.keep}.json"
    out = Path(__file__).parent / "results" / "headstart_parts" / name
    write_json(out, {"model": str(source), "fingerprint": moe.fingerprint(), "task": args.task, "keep": args.keep,
                     "full_accuracy": full, "selection": selection.to_dict(), "lr": args.lr, "max_steps": args.max_steps,
                     "argv": sys.argv[1:] if argv is None else list(argv), "rows": rows})
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
