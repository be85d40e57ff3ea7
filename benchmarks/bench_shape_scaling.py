"""How each stage's cost grows with tokens, experts and layers: log-log figures with fitted exponents.

Models are built in memory in bf16 with Qwen3-30B-A3B's layer widths (hidden 2048,
experts 768 wide, top-8; fewer experts than 8 route to all of them) and a 4096-token
vocabulary (the layers' cost, not the head's), random uniform weights. One axis moves
at a time from the base point (1 MoE layer, 64 experts, 1024 tokens):

- attribution: ``collect_attribution`` (frequency; REAP) and a plain forward over the
  same batches, against tokens, experts and layers;
- sweep: evaluating one point in mask mode (``mask_experts`` + scoring the task's
  answers teacher-forced, the sweep's answer loss) against the unmasked evaluation,
  against experts and layers;
- detect: one comparison of the model with its half-pruned copy (default settings),
  split into signatures, similarity/evidence and the assignments, against experts
  and layers; the assignment's ``O(E^3)`` is extrapolated to where it overtakes the rest;
- realign: one ``train`` step over every parameter and over the experts, against
  tokens, experts and layers;
- prune: the streaming prune of a written checkpoint (cold), against layers and experts
  (its bytes).

Each point runs in a fresh process; times are medians of ``--repeats``. The exponent
of ``cost ~ x^b`` is the least-squares slope in log-log. Figures go to
``benchmarks/results/shapes/scaling_<stage>.png``.

    python benchmarks/bench_shape_scaling.py [--stages attribution,sweep,detect,realign,prune] [--workdir /tmp/shapes]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from shapes import RESULTS, PartTimer, drop_cached, emit, load_average, machine, remove, run_child, save_results

BASE = {"layers": 1, "experts": 64, "tokens": 1024}
# Two to three points per axis, one fresh process each: enough for a slope, sized to finish in well under an hour.
AXES = {
    "attribution": {"tokens": [256, 1024, 4096], "experts": [16, 64, 256], "layers": [1, 2, 4]},
    "sweep": {"experts": [16, 64, 256], "layers": [1, 4]},
    "detect": {"experts": [16, 64, 256], "layers": [1, 2, 4]},
    "realign": {"tokens": [256, 1024], "experts": [16, 64], "layers": [1, 2]},
    "prune": {"experts": [32, 128], "layers": [1, 4]},
}


def config_for(layers: int, experts: int):
    from moeguard.models.random_init import real_shape_config

    return real_shape_config("qwen3-30b-a3b", moe_layers=layers, num_experts=experts,
                             num_experts_per_tok=min(8, experts // 2), vocab_size=4096)


def build(layers: int, experts: int):
    """The model, allocated without transformers' initialisation and filled with cheap uniform noise."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from moeguard.data import build_char_tokenizer
    from moeguard.models import MoEModel

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config_for(layers, experts), dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.uniform_(-0.035, 0.035, generator=generator)  # std 0.02
    model.eval()
    return MoEModel.from_model(model, build_char_tokenizer(), source=None)


def token_batches(tokens: int, *, batch: int = 8, seed: int = 0):
    import torch

    length = max(8, tokens // batch)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 99, (batch, length), generator=generator)
    return [{"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": input_ids.clone(), "example_index": torch.arange(batch)}]


def timed(fn, repeats: int) -> float:
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return statistics.median(values)


# ---------------------------------------------------------------------------- one point of each stage (in a child)


def point_attribution(args) -> dict:
    import torch

    from moeguard.attribution import collect_attribution

    moe = build(args.layers, args.experts)
    moe.fingerprint()
    batches = token_batches(args.tokens)

    def plain(**extra) -> None:
        with torch.no_grad():
            moe.model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"], **extra)

    variants = {"plain": plain, "plain_last_logits": lambda: plain(logits_to_keep=1),
                "frequency": lambda: collect_attribution(moe, batches, criteria=["frequency"], progress=False),
                "reap": lambda: collect_attribution(moe, batches, criteria=["reap"], progress=False)}
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def point_sweep(args) -> dict:
    from moeguard.data import load_task
    from moeguard.pruning.sweep import answer_loss

    moe = build(args.layers, args.experts)
    data = load_task("reverse", "test", limit=16)
    keep = {layer.index: list(range(max(layer.top_k, layer.num_experts // 2))) for layer in moe.layers}
    answer_loss(moe, data, 8)

    def masked() -> None:
        with moe.mask_experts(keep):
            answer_loss(moe, data, 8)

    return {"unmasked": timed(lambda: answer_loss(moe, data, 8), args.repeats), "masked": timed(masked, args.repeats)}


def point_detect(args) -> dict:
    from moeguard.forensics.detect import detect

    parent = build(args.layers, args.experts)
    suspect = parent.weight_sharing_copy()
    suspect.prune({layer.index: list(range(max(layer.top_k, layer.num_experts // 2))) for layer in suspect.layers})
    parent.fingerprint(), suspect.fingerprint()
    timer = PartTimer()
    timer.wrap_detect()
    runs = []
    for _ in range(args.repeats):
        timer.seconds.clear()
        start = time.perf_counter()
        detect(parent, suspect, progress=False)
        runs.append({"total": time.perf_counter() - start, **timer.seconds})
    result = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    result["similarity"] = result["comparison"] - result["assignment"]
    return result


def point_realign(args) -> dict:
    from moeguard.realign.scopes import scope_parameters
    from moeguard.training import train

    moe = build(args.layers, args.experts)
    batches = token_batches(args.tokens)
    result = {}
    for scope in ("all", "experts"):
        parameters = list(scope_parameters(moe, scope).values())
        train(moe, batches, steps=1, lr=1e-7, parameters=parameters, progress=False)
        result[scope] = timed(lambda: train(moe, batches, steps=1, lr=1e-7, parameters=parameters, progress=False),
                              args.repeats)
    return result


def point_prune(args) -> dict:
    from moeguard.data import build_char_tokenizer
    from moeguard.models.random_init import write_random_checkpoint
    from moeguard.pruning.streaming import streaming_prune

    source, out = Path(args.workdir) / "scaling-checkpoint", Path(args.workdir) / "scaling-pruned"
    remove(source)
    written = write_random_checkpoint(config_for(args.layers, args.experts), source, max_shard_size="4GB",
                                      tokenizer=build_char_tokenizer(), progress=False)
    keep = {layer: list(range(args.experts // 2)) for layer in range(args.layers)}
    values = []
    for _ in range(args.repeats):
        remove(out)
        drop_cached([source])
        start = time.perf_counter()
        streaming_prune(source, keep, out, progress=False)
        values.append(time.perf_counter() - start)
    remove(out)
    remove(source)
    return {"streaming": statistics.median(values), "bytes": written.total_bytes}


POINTS = {"attribution": point_attribution, "sweep": point_sweep, "detect": point_detect, "realign": point_realign,
          "prune": point_prune}


# ---------------------------------------------------------------------------- fits and figures


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def figure(stage: str, curves: dict[str, dict[str, tuple[list[float], list[float]]]],
           memory: dict[str, tuple[list[float], list[float]]], path: Path) -> Path:
    """One column per axis: each measured cost (top) and the process's peak memory (bottom) against the axis,
    log-log, with fitted exponents."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from moeguard.plotting import pyplot, save_figure

    plt = pyplot()
    fig, panels = plt.subplots(2, len(curves), figsize=(4.2 * len(curves), 6.8), squeeze=False)
    for column, (axis, lines) in enumerate(curves.items()):
        rows = ((panels[0][column], lines, "seconds"), (panels[1][column], {"peak RSS": memory[axis]}, "peak GB"))
        for panel, plotted, unit in rows:
            for label, (xs, ys) in plotted.items():
                panel.loglog(xs, ys, "o-", label=f"{label}: b = {exponent(xs, ys):.2f}")
            panel.set_xticks(next(iter(plotted.values()))[0])
            panel.xaxis.set_major_formatter(ScalarFormatter())
            panel.xaxis.set_minor_formatter(NullFormatter())
            panel.set_xlabel(axis)
            panel.set_ylabel(unit)
            panel.grid(True, which="both", alpha=0.3)
            panel.legend(fontsize=8)
    fig.suptitle(f"{stage}: cost ~ x^b (Qwen3-30B-A3B layer widths, bf16)")
    return save_figure(fig, path)


def measured_lines(stage: str, result: dict) -> dict[str, tuple[list[float], list[float]]]:
    """The costs plotted for a stage at one axis's points."""
    keys = {"attribution": ["plain", "plain_last_logits", "frequency", "reap"], "sweep": ["unmasked", "masked"],
            "detect": ["total", "signatures", "similarity", "assignment"], "realign": ["all", "experts"],
            "prune": ["streaming"]}[stage]
    xs = [p["x"] for p in result]
    return {key: (xs, [max(p["cost"][key], 1e-6) for p in result]) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(AXES))
    parser.add_argument("--workdir", default="/tmp/moeguard-shapes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=BASE["layers"], help=argparse.SUPPRESS)
    parser.add_argument("--experts", type=int, default=BASE["experts"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=BASE["tokens"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit({"cost": POINTS[args.stage](args)})
        return
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "base": BASE, "stages": {}}
    earlier = RESULTS / "scaling.json"
    if earlier.is_file():  # stages measured by an earlier run are kept
        report["stages"] = json.loads(earlier.read_text()).get("stages", {})
    for stage in args.stages.split(","):
        curves, memory, fits, loads = {}, {}, {}, [load_average()]
        for axis, values in AXES[stage].items():
            points = []
            for value in values:
                point = dict(BASE, **{axis: value})
                result = run_child(Path(__file__).resolve(), ["--stage", stage, "--workdir", args.workdir, "--repeats",
                                                              str(args.repeats)] + [f"--{k}={v}" for k, v in point.items()])
                x = result["cost"].get("bytes", value) if stage == "prune" else value
                points.append({"x": x, "value": value, "cost": result["cost"], "peak_rss": result["peak_rss"]})
                print(f"  {stage} {axis}={value}: " + ", ".join(f"{k} {v:.3g}" for k, v in result["cost"].items()),
                      flush=True)
            label = "checkpoint bytes" if stage == "prune" else axis
            panel = f"{label} ({axis} varied)" if stage == "prune" else axis
            curves[panel] = measured_lines(stage, points)
            memory[panel] = ([p["x"] for p in points], [p["peak_rss"] / 1e9 for p in points])
            fits[axis] = {key: exponent(*line) for key, line in curves[panel].items()}
            fits[axis]["peak_rss"] = exponent(*memory[panel])
            report["stages"].setdefault(stage, {})[axis] = points
            loads.append(load_average())
        path = figure(stage, curves, memory, RESULTS / f"scaling_{stage}.png")
        report["stages"][stage]["exponents"] = fits
        report["stages"][stage]["load_average"] = loads
        print(f"{stage}: exponents " + "; ".join(f"{axis}: " + ", ".join(f"{k} {b:.2f}" for k, b in keys.items())
                                                 for axis, keys in fits.items()) + f" -> {path}", flush=True)
        save_results("scaling", report)


if __name__ == "__main__":
    main()
