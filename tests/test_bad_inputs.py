"""A table of bad inputs and faults against every command of the CLI.

For each case: the command exits non-zero, stderr holds one line saying what is wrong
(``moeguard COMMAND: error: ...`` or argparse's ``... error: ...``) and no traceback,
and the workspace the case ran in is byte for byte what it was: no input changed,
nothing partial (temporary or half-written output) left behind.

Each case gets a fresh copy of a small workspace: a tiny random Qwen3-MoE with its
tokenizer (``model``), an attribution of it (``attr.json`` + ``attr.safetensors``), a
pruned copy (``pruned``), a fine-tuning protocol (``protocol.json``) and a data file
(``data.jsonl``). ``prepare`` functions damage the copy before the command runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from moeguard.cli import main

# ---------------------------------------------------------------- the workspace


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """The workspace every case starts from."""
    from moeguard.data import build_char_tokenizer, load_task, save_jsonl
    from moeguard.defense.protocol import make_protocol
    from moeguard.models import load_moe
    from moeguard.models.random_init import random_moe

    root = tmp_path_factory.mktemp("golden")
    tokenizer = build_char_tokenizer()
    moe = random_moe("qwen3_moe", vocab=len(tokenizer))
    moe.tokenizer = tokenizer
    moe.save(root / "model")
    assert main(["-q", "attribute", "--model", str(root / "model"), "--task", "upper", "--samples", "8",
                 "--device", "cpu", "--out", str(root / "attr.json")]) == 0
    assert main(["-q", "prune", "--model", str(root / "model"), "--attribution", str(root / "attr.json"),
                 "--keep", "4", "--device", "cpu", "--out", str(root / "pruned")]) == 0
    make_protocol(load_moe(root / "model")).save(root / "protocol.json")
    save_jsonl(load_task("upper", "pool", limit=24), root / "data.jsonl")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with the SHA-256 of each file."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        found[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


# ---------------------------------------------------------------- ways to damage a workspace


def write(name: str, text: str) -> Callable[[Path], None]:
    def prepare(ws: Path) -> None:
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(text)

    return prepare


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def prepare(ws: Path) -> None:
        (ws / name).write_bytes(data)

    return prepare


def lines(name: str, *objects: object) -> Callable[[Path], None]:
    return write(name, "".join(json.dumps(o) + "\n" for o in objects))


def edit_json(name: str, change: Callable[[dict], None], *, rehash_protocol: bool = False) -> Callable[[Path], None]:
    def prepare(ws: Path) -> None:
        data = json.loads((ws / name).read_text())
        change(data)
        if rehash_protocol:  # a careful forger recomputes the protocol's own hash
            from moeguard.defense.protocol import content_hash

            data["sha256"] = content_hash({k: v for k, v in data.items() if k != "sha256"})
        (ws / name).write_text(json.dumps(data))

    return prepare


def edit_weights(change: Callable[[dict], dict], directory: str = "model") -> Callable[[Path], None]:
    def prepare(ws: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = ws / directory / "model.safetensors"
        tensors = change(load_file(path))
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, path, metadata={"format": "pt"})

    return prepare


def pickle_only(ws: Path) -> None:
    import torch
    from safetensors.torch import load_file

    weights = ws / "model" / "model.safetensors"
    torch.save(load_file(weights), ws / "model" / "pytorch_model.bin")
    weights.unlink()


def truncate_weights(ws: Path) -> None:
    path = ws / "model" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def random_weights(ws: Path) -> None:
    (ws / "model" / "model.safetensors").write_bytes(os.urandom(4096))


def attribution_tensors(data: bytes) -> Callable[[Path], None]:
    """Replace the attribution's tensor file and record its hash, so only the content is wrong."""
    def prepare(ws: Path) -> None:
        (ws / "attr.safetensors").write_bytes(data)
        record = json.loads((ws / "attr.json").read_text())
        record["tensors"]["sha256"] = hashlib.sha256(data).hexdigest()
        (ws / "attr.json").write_text(json.dumps(record))

    return prepare


def both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(ws: Path) -> None:
        for step in steps:
            step(ws)

    return prepare


def manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return edit_json("pruned/moeguard_manifest.json", change)


LONG = "x" * 100_000  # far beyond the tiny model's context of 256 tokens


# ---------------------------------------------------------------- the table


@dataclass
class Case:
    name: str
    command: str  # {ws} is the workspace
    message: str  # a substring of the one error line
    prepare: Callable[[Path], None] | None = None


M, A, P = "--model {ws}/model", "--attribution {ws}/attr.json", "--device cpu"
CASES = [
    # ---- data loss: no output may be, contain or lie inside an input, --overwrite or not
    Case("prune onto its own model", f"prune {M} {A} --keep 4 --out {{ws}}/model --overwrite {P}", "is the input"),
    Case("prune into a folder holding its model", f"prune {M} {A} --keep 4 --out {{ws}} --overwrite {P}", "contains the input"),
    Case("prune into its model's folder", f"prune {M} {A} --keep 4 --out {{ws}}/model/pruned {P}", "lies inside the input"),
    Case("streaming prune onto its model", f"prune {M} {A} --keep 4 --streaming --out {{ws}}/model --overwrite",
         "is the input"),
    Case("prune onto its attribution", f"prune {M} {A} --keep 4 --out {{ws}}/attr.json --overwrite {P}", "is the input"),
    Case("prune onto an existing model", f"prune {M} {A} --keep 4 --out {{ws}}/pruned {P}", "already exists"),
    Case("prune onto a file", f"prune {M} {A} --keep 4 --out {{ws}}/data.jsonl {P}", "is a file, not a directory"),
    Case("harden onto its model", f"harden {M} --tasks upper --steps 2 --out {{ws}}/model --overwrite {P}", "is the input"),
    Case("harden onto its data", f"harden {M} --data {{ws}}/data.jsonl --steps 2 --out {{ws}} --overwrite {P}",
         "contains the input"),
    Case("attribute's tensor file into the model", f"attribute {M} --task upper --out {{ws}}/model/model.json {P}",
         "lies inside the input"),
    Case("attribute's tensor file already there", f"attribute {M} --task upper --out {{ws}}/attr2.json {P}",
         "attr2.safetensors already exists", write("attr2.safetensors", "keep me")),
    Case("attribute onto its data", f"attribute {M} --data {{ws}}/data.jsonl --out {{ws}}/data.jsonl --overwrite {P}",
         "is the input"),
    Case("attribute figures into the model", f"attribute {M} --task upper --out {{ws}}/a.json --figures {{ws}}/model {P}",
         "is the input"),
    Case("attribute onto a directory", f"attribute {M} --task upper --out {{ws}}/pruned {P}", "is a directory"),
    Case("data export over a file", "data export --task upper --out {ws}/data.jsonl", "already exists"),
    Case("data export onto a directory", "data export --task upper --out {ws}/model", "is a directory"),
    Case("detect --out a directory", f"detect --parent {{ws}}/model --suspect {{ws}}/pruned --out {{ws}}/elsewhere {P}",
         "is a directory", write("elsewhere/note.txt", "mine")),
    Case("detect onto its parent", f"detect --parent {{ws}}/model --suspect {{ws}}/pruned --out {{ws}}/model {P}",
         "is the input"),
    Case("verify-watermark onto its suspect", "verify-watermark --suspect {ws}/model --key owner-key-0001 --tasks upper "
         "--out {ws}/model/config.json", "lies inside the input"),
    Case("verify-watermark over another file", "verify-watermark --suspect {ws}/model --key owner-key-0001 --tasks upper "
         "--out {ws}/v.json", "already exists", write("v.json", "{}")),
    Case("verify-watermark with a short key", "verify-watermark --suspect {ws}/model --key short --tasks upper",
         "at least 8 characters"),
    Case("verify-watermark --min-matches 0", "verify-watermark --suspect {ws}/model --key owner-key-0001 --tasks upper "
         "--min-matches 0", "--min-matches"),
    Case("verify-watermark on a classification task", "verify-watermark --suspect {ws}/model --key owner-key-0001 "
         "--tasks topic", "generation tasks only"),
    Case("verify-watermark with a data file as its record", "verify-watermark --suspect {ws}/model --key owner-key-0001 "
         "--record {ws}/data.jsonl", "data.jsonl"),
    Case("detect over another file", f"detect --parent {{ws}}/model --suspect {{ws}}/pruned --out {{ws}}/v.json {P}",
         "already exists", write("v.json", "{}")),
    Case("detect figure into the suspect", f"detect --parent {{ws}}/model --suspect {{ws}}/pruned --figure {{ws}}/pruned/f.png {P}",
         "lies inside the input"),
    Case("protocol over an existing file", "verify --parent {ws}/model --write --protocol {ws}/protocol.json", "already exists"),
    Case("protocol into the parent", "verify --parent {ws}/model --write --protocol {ws}/model/p.json --overwrite",
         "lies inside the input"),
    Case("zoo train over a folder that is no model", "zoo train --out {ws}/notes --overwrite --steps 1",
         "holds no model", write("notes/todo.txt", "mine")),
    Case("realign onto its model", "realign --model {ws}/pruned --task upper --budget 8 --out {ws}/pruned", "is the input"),
    Case("realign into a folder holding its parent",
         "realign --model {ws}/pruned --parent {ws}/model --task upper --budget 8 --out {ws}", "contains the input"),
    Case("sweep onto its model", f"sweep {M} --task upper --out {{ws}}/model {P}", "is the input"),
    Case("audit onto its model", "audit --model {ws}/model --task upper --out {ws}/model", "is the input"),
    Case("defense-eval onto a defended model",
         f"defense-eval {M} --defended same={{ws}}/pruned --out {{ws}}/pruned {P}", "is the input"),
    # ---- code execution: pickles are refused unless allowed
    Case("pickle weights (inspect)", "inspect --model {ws}/model", "pickle", pickle_only),
    Case("pickle weights (evaluate)", f"evaluate {M} --task upper --limit 2 {P}", "pickle", pickle_only),
    Case("pickle weights (prune)", f"prune {M} {A} --keep 4 --out {{ws}}/p2 {P}", "pickle", pickle_only),
    # ---- silent wrong results
    Case("missing expert tensors", "inspect --model {ws}/model", "2 missing (model.layers.1.mlp.experts",
         edit_weights(lambda t: {k: v for k, v in t.items() if "layers.1.mlp.experts" not in k})),
    Case("an unexpected tensor", "inspect --model {ws}/model", "1 unexpected (model.extra.weight)",
         edit_weights(lambda t: {**t, "model.extra.weight": t["lm_head.weight"][:2]})),
    Case("a tensor of the wrong shape", "inspect --model {ws}/model", "of the wrong shape (model.embed_tokens.weight)",
         edit_weights(lambda t: {**t, "model.embed_tokens.weight": t["model.embed_tokens.weight"][:10]})),
    Case("manifest with a repeated expert", "inspect --model {ws}/pruned", "more than once",
         manifest(lambda m: m["kept"][0].__setitem__(1, m["kept"][0][0]))),
    Case("manifest with an expert out of range", "inspect --model {ws}/pruned", "but the parent layer has 8",
         manifest(lambda m: m["kept"][1].__setitem__(0, 99))),
    Case("manifest keeping more experts than the model has", "inspect --model {ws}/pruned", "keeps 5 experts by the manifest",
         manifest(lambda m: m["kept"][0].append(max(set(range(8)) - set(m["kept"][0]))))),
    Case("manifest of another model (layers)", "inspect --model {ws}/pruned", "for 1 MoE layers",
         manifest(lambda m: m.update(kept=m["kept"][:1], parent_num_experts=[8], layer_paths=m["layer_paths"][:1]))),
    Case("manifest with a path-like layer", "inspect --model {ws}/pruned", "layer_paths must list one module path",
         manifest(lambda m: m["layer_paths"].__setitem__(0, "../../etc/passwd"))),
    Case("manifest with a bad fingerprint", "inspect --model {ws}/pruned", "SHA-256 hex digest",
         manifest(lambda m: m.update(parent_fingerprint="../model"))),
    Case("manifest lineage that is no manifest", "inspect --model {ws}/pruned", "lineage[0]",
         manifest(lambda m: m.update(lineage=[{"kept": 3}]))),
    Case("protocol with experts permitted by hand", "verify --parent {ws}/model --model {ws}/model --protocol {ws}/protocol.json",
         "changed after it was written", edit_json("protocol.json", lambda p: p["permitted"].append("experts"))),
    Case("protocol edited and re-hashed", "verify --parent {ws}/model --model {ws}/model --protocol {ws}/protocol.json",
         "the two disagree", edit_json("protocol.json", lambda p: p["permitted"].append("experts"), rehash_protocol=True)),
    Case("protocol hashes forged for another parent",
         "verify --parent {ws}/model --model {ws}/model --protocol {ws}/protocol.json", "does not describe the parent",
         edit_json("protocol.json", lambda p: p["layers"][0]["expert_hashes"].reverse(), rehash_protocol=True)),
    Case("protocol not the published one",
         "verify --parent {ws}/model --model {ws}/model --protocol {ws}/protocol.json --protocol-sha256 00ff", "not the 00ff"),
    Case("protocol of an older format", "verify --parent {ws}/model --model {ws}/model --protocol {ws}/protocol.json",
         "format 1 is not supported", edit_json("protocol.json", lambda p: p.update(format=1))),
    Case("a prompt beyond the context (evaluate)", f"evaluate {M} --data {{ws}}/long.jsonl {P}", "long.jsonl line 2",
         lines("long.jsonl", {"prompt": "up ab=", "answer": "AB"}, {"prompt": LONG, "answer": "X"})),
    Case("a prompt beyond the context (attribute)", f"attribute {M} --data {{ws}}/long.jsonl --out {{ws}}/a.json {P}",
         "long.jsonl line 1", lines("long.jsonl", {"prompt": LONG, "answer": "X"})),
    Case("a prompt beyond the context (realign)",
         f"realign --model {{ws}}/pruned --data {{ws}}/long.jsonl --budget 2 --rounds 1 --out {{ws}}/r {P}",
         "long.jsonl line 3", lines("long.jsonl", *[{"prompt": "up a=", "answer": "A"}] * 2, {"prompt": LONG, "answer": "X"},
                                    *[{"prompt": "up b=", "answer": "B"}] * 5)),
    Case("an empty text line", f"evaluate {M} --data {{ws}}/t.jsonl {P}", "t.jsonl line 2: field 'text' is empty",
         lines("t.jsonl", {"text": "some words"}, {"text": ""})),
    Case("an empty answer", f"evaluate {M} --data {{ws}}/t.jsonl {P}", "t.jsonl line 1: field 'answer' is empty",
         lines("t.jsonl", {"prompt": "up a=", "answer": ""})),
    # ---- clear errors instead of tracebacks
    Case("truncated weights", "inspect --model {ws}/model", "damaged or not what their names say", truncate_weights),
    Case("random bytes as weights", "inspect --model {ws}/model", "damaged or not what their names say", random_weights),
    Case("a truncated shard in a streaming prune", f"prune {M} {A} --keep 4 --streaming --out {{ws}}/p2",
         "damaged or truncated", truncate_weights),
    Case("attribute --batch-size 0", f"attribute {M} --task upper --batch-size 0 --out {{ws}}/a.json {P}", "--batch-size"),
    Case("attribute --samples 0", f"attribute {M} --task upper --samples 0 --out {{ws}}/a.json {P}", "--samples"),
    Case("answer tokens of plain text", f"attribute {M} --data {{ws}}/t.jsonl --tokens answer --out {{ws}}/a.json {P}",
         "plain text", lines("t.jsonl", {"text": "abc"})),
    Case("a protected expert out of range", f"prune {M} {A} --keep 4 --protect 0:99 --out {{ws}}/p2 {P}", "0:99"),
    Case("keep more experts than there are", f"prune {M} {A} --keep 99 --out {{ws}}/p2 {P}", "keep=99"),
    Case("keep fewer than top-k", f"prune {M} {A} --keep 1 --out {{ws}}/p2 {P}", "top_k"),
    Case("attribution tensors outside its folder", f"prune {M} {A} --keep 4 --out {{ws}}/p2 {P}",
         "must name a file in the same directory", edit_json("attr.json", lambda a: a["tensors"].update(file="../attr.safetensors"))),
    Case("attribution tensors at an absolute path", f"prune {M} {A} --keep 4 --out {{ws}}/p2 {P}",
         "must name a file in the same directory", edit_json("attr.json", lambda a: a["tensors"].update(file="/etc/passwd"))),
    Case("attribution that is not JSON", f"prune {M} {A} --keep 4 --out {{ws}}/p2 {P}", "not valid JSON",
         write("attr.json", "\x00\x01garbage")),
    Case("attribution tensors of random bytes", f"prune {M} {A} --keep 4 --out {{ws}}/p2 {P}", "not a readable safetensors",
         attribution_tensors(os.urandom(300))),
    Case("attribution tensors of another run", f"prune {M} {A} --keep 4 --out {{ws}}/p2 {P}", "does not belong to",
         write("attr.safetensors", "other")),
    Case("attribution with a damaged layer list", f"prune {M} {A} --keep 4 --out {{ws}}/p2 {P}", "damaged",
         edit_json("attr.json", lambda a: a["layers"][0].update(num_experts="eight"))),
    Case("sweep keeping too many", f"sweep {M} --task upper --keep 99 --out {{ws}}/s {P}", "keep=99"),
    Case("sweep with an unknown criterion", f"sweep {M} --task upper --criteria magic --out {{ws}}/s {P}", "--criteria"),
    Case("sweep with batch size 0", f"sweep {M} --task upper --batch-size 0 --out {{ws}}/s {P}", "--batch-size"),
    Case("sweep of an unknown task", f"sweep {M} --task nosuch --out {{ws}}/s {P}", "nosuch"),
    Case("a missing model", "inspect --model {ws}/nothing", "does not exist"),
    Case("a file as the model", "inspect --model {ws}/data.jsonl", "is a file, not a model directory"),
    Case("a folder that is no model", "inspect --model {ws}/notes", "has no config.json", write("notes/a.txt", "x")),
    Case("a config that is not JSON", "inspect --model {ws}/model", "cannot load the model config",
         write("model/config.json", "{not json")),
    Case("a tokenizer that does not load", f"evaluate {M} --task upper --limit 2 {P}", "tokenizer does not load",
         write("model/tokenizer.json", "{broken")),
    Case("an unknown task", f"evaluate {M} --task nosuch {P}", "nosuch"),
    Case("a missing data file", f"evaluate {M} --data {{ws}}/none.jsonl {P}", "does not exist"),
    Case("a line that is not JSON", f"evaluate {M} --data {{ws}}/b.jsonl {P}", "b.jsonl line 2: not valid JSON",
         write("b.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": \n')),
    Case("a field of the wrong type", f"evaluate {M} --data {{ws}}/b.jsonl {P}", "field 'answer' must be a string",
         lines("b.jsonl", {"prompt": "a", "answer": 3})),
    Case("a label out of range", f"evaluate {M} --data {{ws}}/b.jsonl {P}", "field 'label' is 5",
         lines("b.jsonl", {"prompt": "a", "choices": ["x", "y"], "label": 5})),
    Case("data that is not UTF-8", f"evaluate {M} --data {{ws}}/b.jsonl {P}", "not UTF-8",
         write_bytes("b.jsonl", b'{"prompt": "\xff\xfe", "answer": "a"}\n')),
    Case("evaluate --batch-size 0", f"evaluate {M} --task upper --batch-size 0 {P}", "batch_size"),
    Case("evaluate --limit 0", f"evaluate {M} --task upper --limit 0 {P}", "--limit"),
    Case("a CUDA device without CUDA", f"evaluate {M} --task upper --device cuda:3", "CUDA is not available"),
    Case("an unknown dtype", f"evaluate {M} --task upper --dtype float8", "invalid choice"),
    Case("realign --budget 0", f"realign --model {{ws}}/pruned --task upper --budget 0 --out {{ws}}/r {P}", "budget"),
    Case("realign an unpruned model", f"realign {M} --task upper --budget 8 --out {{ws}}/r {P}", "no moeguard_manifest.json"),
    Case("realign against another parent",
         f"realign --model {{ws}}/pruned --parent {{ws}}/pruned --task upper --budget 8 --rounds 2 --out {{ws}}/r {P}",
         "was carved from the model"),
    Case("harden an unknown task", f"harden {M} --tasks nosuch --out {{ws}}/h {P}", "nosuch"),
    Case("harden with an unknown group", f"harden {M} --tasks upper --permit wings --out {{ws}}/h {P}", "wings"),
    Case("detect --weight-rows -1", "detect --parent {ws}/model --suspect {ws}/pruned --weight-rows -1", "--weight-rows"),
    Case("defense-eval without a name", f"defense-eval {M} --defended {{ws}}/pruned --out {{ws}}/d {P}", "NAME=PATH"),
    Case("audit --budget 0", "audit --model {ws}/model --task upper --budget 0 --out {ws}/au", "budget"),
    Case("audit of a missing data file", "audit --model {ws}/model --data {ws}/none.jsonl --out {ws}/au", "no such file"),
    Case("zoo train with no experts", "zoo train --out {ws}/z --experts 0", "experts must be a positive integer"),
    Case("data export of an unknown task", "data export --task nosuch --out {ws}/x.jsonl", "nosuch"),
    Case("verify with nothing to verify", "verify --parent {ws}/model --protocol {ws}/protocol.json", "give --model"),
    Case("verify with a protocol that is not JSON", "verify --parent {ws}/model --model {ws}/model --protocol {ws}/data.jsonl",
         "not valid JSON"),
    Case("an output inside a file", f"attribute {M} --task upper --out {{ws}}/ro/a.json {P}",
         "is a file, so nothing can be written inside it", write("ro", "a file where a folder is expected")),
]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse refuses its own arguments this way
        code = stop.code
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_input_is_refused_with_one_clear_line_and_changes_nothing(case, golden, tmp_path, capsys, one_thread):
    ws = tmp_path / "ws"
    shutil.copytree(golden, ws)
    if case.prepare is not None:
        case.prepare(ws)
    before = snapshot(ws)
    code, stderr = run_cli(shlex.split(case.command.format(ws=ws)), capsys)
    assert code not in (0, None), f"{case.name}: exit {code}"
    assert "Traceback" not in stderr, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert case.message in errors[0], errors[0]
    assert snapshot(ws) == before, f"{case.name}: the workspace changed"


def test_the_table_covers_every_command_and_at_least_sixty_cases():
    from moeguard.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    used = {case.command.split()[0] for case in CASES}
    assert used == commands and len(CASES) >= 60


@pytest.mark.slow
def test_ctrl_c_during_start_up_says_interrupted_and_exits_130(golden):
    """The command is interrupted while it imports torch and transformers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "moeguard", "inspect", "--model", str(golden / "model")],
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    time.sleep(0.8)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
