"""Benchmark: do the defenses work? Training overhead, then the full defense evaluation (the head start).

Models, all from the same demo configuration and seed:

- ``undefended``: the demo model as the zoo trains it;
- ``control`` (with ``--control``): the demo fine-tuned with the hardening budget and
  data but no defense term (so that an effect is the defense's, not the extra fine-tuning's);
- one model per hardening method (``moeguard harden``: fine-tune the demo with it);
- ``<method>-scratch-<strength>`` (with ``--scratch``): the demo trained defended from
  scratch (``zoo train --defense``), its term weights scaled by ``--scratch-strength``.

Then:

1. training overhead: one training step (forward, loss, backward) of each method
   vs a plain step on the same batch, median of interleaved repeats, and each
   hardening run's wall and CPU time;
2. :func:`moeguard.defense.evaluation.evaluate_defenses` on every model: utility,
   knowledge loss, the carver's head start against the strongest attacker (tuned on
   tuning seeds, reported on fresh seeds) and labels to the target. Every run is
   cached under ``--out``: stop the script at any time and rerun it.

    python benchmarks/bench_defense.py --demo default

The attacker, its grids and budgets default to :class:`DefenseEvalSettings`; its
options (``--target-tasks``, ``--attack-keeps``, ``--report-seeds``, ``--carve-lrs``,
``--scratch-steps``, ...) shrink it to fit a machine. The work directory (models and the per-run cache)
defaults to ``$MOEGUARD_CACHE/bench_defense/<demo>``: models under
``models/h<hardening steps>/``, each evaluation under ``eval-<hash of its settings>/``
so that a rerun with the same options resumes and one with other options starts
afresh. The tables, JSON and figures are copied to ``benchmarks/results/defense/<demo>/``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from moeguard.data import batches, load_task, mixture
from moeguard.defense.evaluation import DefenseEvalSettings, evaluate_defenses
from moeguard.defense.harden import (
    HardenSettings,
    demo_defense_loss,
    harden_to_directory,
    load_defense_tasks,
    method_settings,
    task_of_examples,
)
from moeguard.cli.common import add_config_arguments, config_from_args
from moeguard.defense.objective import DefenseObjective, defense_config
from moeguard.defense.report import markdown_tables, write_report
from moeguard.io import atomic_dir, write_json
from moeguard.models import load_moe
from moeguard.training import token_cross_entropy, train
from moeguard.zoo import TINY_DEMO, DemoConfig, cache_root, demo_model_path, train_demo

DEMOS = {"tiny": TINY_DEMO, "default": DemoConfig()}


def harden_demo(demo: Path, method: str, out: Path, tasks: list[str], settings: HardenSettings) -> Path:
    if out.is_dir():
        return out
    train_tasks, test_tasks = load_defense_tasks(",".join(tasks), [], train_examples=4000, eval_examples=100)
    harden_to_directory(load_moe(demo), train_tasks, test_tasks, defense_config(method), settings, out=out,
                        permitted=["router", "attention"], method=method)
    return out


def control_demo(demo: Path, out: Path, tasks: list[str], settings: HardenSettings) -> Path:
    """The demo fine-tuned exactly as hardening does it, without any defense term."""
    if out.is_dir():
        return out
    moe = load_moe(demo)
    train_tasks, _ = load_defense_tasks(",".join(tasks), [], train_examples=4000, eval_examples=1)
    stream = batches(moe.tokenizer, mixture(train_tasks), batch_size=settings.batch_size, shuffle=True,
                     seed=settings.seed, epochs=None)
    result = train(moe, stream, steps=settings.steps, lr=settings.lr, warmup=settings.warmup, seed=settings.seed)
    with atomic_dir(out) as tmp:
        moe.save(tmp, overwrite=True)
        write_json(tmp / "harden_report.json", {"method": "control", "wall_seconds": result.wall_seconds,
                                                "settings": dataclasses.asdict(settings)})
    return out


def scratch_demo(config: DemoConfig, method: str, strength: float, out: Path) -> Path:
    if not out.is_dir():
        train_demo(out, config, extra_loss=demo_defense_loss(config, method, strength=strength))
    return out


def step_seconds(moe, batch, objective: DefenseObjective | None) -> float:
    """Wall time of one training step's forward, loss and backward (no optimizer: the same for both)."""
    moe.model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    outputs = moe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = token_cross_entropy(outputs.logits, batch["labels"])
    if objective is not None:
        loss = loss + objective(moe, batch, outputs)
    loss.backward()
    return time.perf_counter() - start


def overhead(demo: Path, methods: list[str], tasks: list[str], batch_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median step time of each method and its ratio to a plain step, interleaved on the same batch."""
    moe = load_moe(demo)
    moe.model.train()
    datas = [load_task(task, "train", limit=64) for task in tasks]
    batch = next(batches(moe.tokenizer, mixture(datas), batch_size=batch_size, shuffle=True, seed=0))
    # Each method on its own copy: keyed embeddings change the model they are made on.
    copies = {m: copy.deepcopy(moe) for m in methods}
    objectives = {m: DefenseObjective(copies[m], defense_config(m), task_of_examples(datas), len(datas)) for m in methods}
    times: dict[str, list[float]] = {"plain": [], **{m: [] for m in methods}}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        times["plain"].append(step_seconds(moe, batch, None))
        for method, objective in objectives.items():
            copies[method].model.train()
            with objective.attached():
                times[method].append(step_seconds(copies[method], batch, objective))
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    return {m: {"median_ms": medians[m] * 1e3, "ratio_to_plain": medians[m] / medians["plain"]} for m in medians}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", choices=list(DEMOS), default="tiny", help="which demo configuration to defend")
    parser.add_argument("--out", default=None, help="work directory (default: $MOEGUARD_CACHE/bench_defense/<demo>)")
    parser.add_argument("--results", default=None, help="where the tables and figures are copied "
                        "(default: benchmarks/results/defense/<demo>)")
    parser.add_argument("--methods", default="entangle,ntl,keys")
    parser.add_argument("--control", action="store_true", help="also evaluate the plain fine-tune without a defense term")
    parser.add_argument("--scratch", default="", help="methods to also train defended from scratch (comma list)")
    parser.add_argument("--scratch-strength", type=float, default=0.1,
                        help="term weights of the from-scratch training (strength 1 kept the demo from learning reverse)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved repeats of the overhead measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for tiny models on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="a small attacker (one task, keep 2, no tuning, two seeds) "
                        "to try things")
    parser.add_argument("--harden-steps", type=int, default=None, help="fine-tuning steps of hardening and of the "
                        "control (default: each method's own budget, moeguard.defense.harden.method_settings)")
    grid = parser.add_argument_group("evaluation grid and budgets (default: DefenseEvalSettings)")
    add_config_arguments(grid, DefenseEvalSettings, flags={"permitted": "--permit"},
                         exclude=("tasks", "acquisition", "steps_per_round", "lr", "seed", "target_retention"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("moeguard").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)

    out = Path(args.out) if args.out else cache_root() / "bench_defense" / args.demo
    out.mkdir(parents=True, exist_ok=True)
    config = DEMOS[args.demo]
    demo = demo_model_path(config)
    tasks = list(config.tasks)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    def budget(method: str) -> HardenSettings:
        settings = method_settings(method)
        return dataclasses.replace(settings, steps=args.harden_steps) if args.harden_steps else settings

    settings = budget("control")
    hardened = out / "models" / (f"h{args.harden_steps}" if args.harden_steps else "default")
    models = {"undefended": demo}
    if args.control:
        models["control"] = control_demo(demo, hardened / "control", tasks, settings)
    models.update({m: harden_demo(demo, m, hardened / m, tasks, budget(m)) for m in methods})
    for method in (m.strip() for m in args.scratch.split(",") if m.strip()):
        name = f"{method}-scratch-{args.scratch_strength:g}"
        models[name] = scratch_demo(config, method, args.scratch_strength, out / "models" / name)

    measured = overhead(demo, methods, tasks, settings.batch_size, args.repeats)
    measured["hardening"] = {name: json.loads((Path(path) / "harden_report.json").read_text()).get("harden", {})
                             for name, path in models.items() if (Path(path) / "harden_report.json").is_file()}
    measured["hardening"] = {name: {k: report.get(k) for k in ("steps", "wall_seconds", "cpu_seconds")}
                             for name, report in measured["hardening"].items()}
    write_json(out / "overhead.json", measured)
    print("training step overhead (forward + loss + backward, median of interleaved repeats):")
    for name, row in measured.items():
        if name != "hardening":
            print(f"  {name:<20} {row['median_ms']:8.1f} ms   x{row['ratio_to_plain']:.2f}")

    base = config_from_args(args, DefenseEvalSettings)
    targets = tuple(t for t in base.target_tasks if t in tasks) or (tasks[0],)
    eval_settings = dataclasses.replace(base, target_tasks=targets, tasks=tuple(tasks))
    if args.quick:
        quick = dataclasses.replace(eval_settings.headstart, selections=("attribution",), carve_lrs=(3e-3,),
                                    scratch_lrs=(3e-3,), losses=("logits",), try_router_reinit=False,
                                    try_canonicalise=False, report_seeds=(0, 1))
        eval_settings = dataclasses.replace(eval_settings, target_tasks=targets[:1], attack_keeps=(2,), headstart=quick,
                                            label_regime=False)
    eval_settings.check()
    # The models (by cache path) and every setting name the evaluation directory.
    identity = json.dumps({"settings": eval_settings.to_dict(), "models": {k: str(v) for k, v in models.items()}},
                          sort_keys=True)
    eval_dir = out / f"eval-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"
    print(f"evaluation directory {eval_dir}", flush=True)
    result = evaluate_defenses(models, eval_settings, eval_dir)
    write_report(result, eval_dir)
    print(markdown_tables(result))
    results = Path(args.results) if args.results else Path(__file__).parent / "results" / "defense" / args.demo
    shutil.rmtree(results, ignore_errors=True)
    shutil.copytree(eval_dir / "figures", results / "figures")
    for name in ("defense_eval.json", "defense_eval.md"):
        shutil.copy(eval_dir / name, results / name)
    shutil.copy(out / "overhead.json", results / "overhead.json")
    write_json(results / "models.json", {name: str(path) for name, path in models.items()})
    write_json(results / "command.json", {"argv": sys.argv[1:] if argv is None else list(argv),
                                          "harden_settings": {m: dataclasses.asdict(budget(m)) for m in ["control", *methods]},
                                          "scratch_strength": args.scratch_strength, "eval_dir": str(eval_dir)})
    print(f"tables and figures copied to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
