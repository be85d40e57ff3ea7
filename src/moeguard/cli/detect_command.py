"""``moeguard detect``: is a suspect model carved out of a parent (or out of which of several candidates)?"""

from __future__ import annotations

import argparse
from pathlib import Path

from moeguard.cli.common import add_model_arguments, load_model, print_json
from moeguard.errors import InputError
from moeguard.forensics import DEFAULT_ALPHA, DEFAULT_PROBES, NullCalibration, calibrate, detect, rank_parents
from moeguard.io import check_outputs, write_json
from moeguard.zoo import local_model_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="decide whether a suspect MoE was carved out of a parent (pruned, disguised, fine-tuned, merged)",
        description=(
            "Maps the suspect's residual space onto the parent's (token rows and residual states, orthogonal Procrustes), "
            "compares every suspect expert with every parent expert there (responses to shared probes and neurons, free "
            "of neuron order, scale and sign) against the parent's other experts, matches them per layer and prints the "
            "verdict, the relation (carved subset / same lineage / independent), the recovered kept sets and what each "
            "merged expert mixes. Model directories "
            "are read one MoE layer of experts at a time, in their stored dtype unless --dtype says otherwise."
        ),
    )
    parser.add_argument("--parent", action="append", required=True, metavar="MODEL",
                        help="the original model (directory, hub id or 'demo'); repeat to rank several candidate parents")
    add_model_arguments(parser, flag="--suspect", help="the model suspected to be derived from it (directory or hub id)")
    parser.add_argument("--reference", action="append", default=[], metavar="DIR",
                        help="an independent model of the parent's shape, or a directory of such model directories, to "
                             "calibrate the verdict on (repeatable; at least 3 models, 20-30 recommended)")
    parser.add_argument("--calibration", default=None, metavar="FILE", help="a calibration saved with --save-calibration")
    parser.add_argument("--save-calibration", default=None, metavar="FILE",
                        help="write the calibration measured on the --reference models to FILE for later runs")
    parser.add_argument("--out", default=None, help="write the full verdict as JSON to this file")
    parser.add_argument("--figure", default=None, help="write a PNG of the per-layer expert similarity with the matches")
    parser.add_argument("--overwrite", action="store_true", help="replace --out, --figure and --save-calibration if they exist")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"false-positive rate of the verdict (default {DEFAULT_ALPHA:g})")
    parser.add_argument("--probes", type=int, default=DEFAULT_PROBES, help=f"probe residuals per expert (default {DEFAULT_PROBES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes (default 0)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON instead of the summary")
    parser.set_defaults(run=run, dtype="auto")


def reference_models(paths: list[str]) -> list[str]:
    """``--reference`` values: model directories as given, a directory of model directories expanded (sorted)."""
    models = []
    for text in paths:
        path = Path(text).expanduser()
        if (path / "config.json").is_file() or not path.is_dir():
            models.append(text)
            continue
        found = sorted(str(child) for child in path.iterdir() if (child / "config.json").is_file())
        if not found:
            raise InputError(f"--reference {text}: neither a model directory (no config.json) nor a directory of model directories.")
        models += found
    return models


def run(args: argparse.Namespace) -> int:
    import torch

    from moeguard.zoo import resolve_model_source

    references = reference_models(args.reference)
    if args.calibration and references:
        raise InputError("give either --reference models or a saved --calibration, not both.")
    if args.save_calibration and not references:
        raise InputError("--save-calibration needs --reference models to measure the calibration on.")
    if args.save_calibration and len(args.parent) > 1:
        raise InputError("--save-calibration works with one --parent (a calibration belongs to one parent).")
    if args.calibration and len(args.parent) > 1:
        raise InputError("--calibration works with one --parent; with several candidates calibrate with --reference.")
    inputs = [local_model_path(name) for name in (*args.parent, args.suspect, *references, args.calibration)]
    check_outputs([args.out, args.figure, args.save_calibration], inputs=inputs, overwrite=args.overwrite)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)

    def source(name: str):
        # Loaded on a device when one is asked for; otherwise read from disk one layer of experts at a time.
        return load_model(args, name) if args.device or args.device_map else resolve_model_source(name)

    options = dict(alpha=args.alpha, probes=args.probes, seed=args.seed, dtype=dtype, progress=not args.quiet)
    suspect = source(args.suspect)
    if len(args.parent) > 1:
        ranking = rank_parents([source(p) for p in args.parent], suspect, references=references, **options)
        if args.out:
            write_json(args.out, ranking.to_dict())
        figure_verdict = ranking.best or ranking.verdicts[ranking.ranking[0]]
        output, text = ranking.to_dict(), ranking.summary()
    else:
        calibration = NullCalibration.load(args.calibration) if args.calibration else None
        if args.save_calibration:
            calibration = calibrate(source(args.parent[0]), references, probes=args.probes, seed=args.seed, dtype=dtype,
                                    progress=not args.quiet)
            calibration.save(args.save_calibration)
            references = []
        verdict = detect(source(args.parent[0]), suspect, references=references, calibration=calibration, **options)
        if args.out:
            write_json(args.out, verdict.to_dict())
        figure_verdict, output, text = verdict, verdict.to_dict(), verdict.summary()
    if args.figure:
        from moeguard.forensics.figures import plot_verdict

        plot_verdict(figure_verdict, args.figure)
    print_json(output) if args.json else print(text)
    return 0
