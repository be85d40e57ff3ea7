"""Resumable work: no pickle is ever loaded, a run resumes only with its own settings, a diverged
run leaves nothing that blocks a rerun, and the hint after Ctrl-C is a command that works."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import tiny_moe

import moeguard.training as training
from moeguard.cli import main
from moeguard.data import batches, build_char_tokenizer, load_task, mixture, save_jsonl
from moeguard.defense.harden import HardenSettings, harden_to_directory
from moeguard.defense.objective import defense_config
from moeguard.errors import MoeGuardError, ResumeError
from moeguard.models import load_moe
from moeguard.realign import RealignConfig, builtin_data, realign
from moeguard.runs import Run, RunCache, code_version
from moeguard.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = build_char_tokenizer()


def char_moe():
    moe = tiny_moe("qwen3_moe")
    moe.tokenizer = TOKENIZER
    return moe


def task_batches(seed: int = 0):
    return batches(TOKENIZER, mixture([load_task("reverse", "train", limit=64)]), batch_size=4, shuffle=True, seed=seed,
                   epochs=None)


def interrupt_at_step(monkeypatch, step: int) -> None:
    """A Ctrl-C when the training loop reaches ``step`` (the learning rate is set first thing in every step)."""
    real = training.learning_rate

    def learning_rate(current, **kwargs):
        if current == step:
            raise KeyboardInterrupt
        return real(current, **kwargs)

    monkeypatch.setattr(training, "learning_rate", learning_rate)


class PlantedPickle:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---------------------------------------------------------------- the helper itself
def test_a_run_continues_only_with_its_own_kind_settings_and_code(tmp_path):
    run = Run.open(tmp_path / "run", "sweep", {"task": "reverse", "options": {"limit": 24, "seeds": (0, 1)}})
    assert not run.resumed
    assert run.get_or_compute("point", lambda: {"accuracy": 0.5}) == {"accuracy": 0.5} and run.computed == 1
    again = Run.open(tmp_path / "run", "sweep", {"task": "reverse", "options": {"limit": 24, "seeds": [0, 1]}})
    assert again.resumed and again.get_or_compute("point", lambda: pytest.fail("recomputed")) == {"accuracy": 0.5}
    assert again.reused == 1 and again.computed == 0
    with pytest.raises(ResumeError, match=r"started with other options: limit=24 \(now 10\)"):
        Run.open(tmp_path / "run", "sweep", {"task": "reverse", "options": {"limit": 10, "seeds": [0, 1]}})
    with pytest.raises(ResumeError, match="holds a sweep, not a re-alignment"):
        Run.open(tmp_path / "run", "re-alignment", {})
    record = Run.record(tmp_path / "run")
    record["code"] = "0.0.1+older"
    (tmp_path / "run" / "moeguard_run.json").write_text(json.dumps(record))
    with pytest.raises(ResumeError, match=re.escape(f"other code (moeguard 0.0.1+older, now {code_version()})")):
        Run.open(tmp_path / "run", "sweep", {"task": "reverse", "options": {"limit": 24, "seeds": [0, 1]}})


def test_a_cache_entry_is_keyed_by_its_inputs_and_the_code_version(tmp_path):
    cache = RunCache(tmp_path)
    assert cache.get_or_compute("evaluate", {"n": 1}, lambda: 1) == (1, False)
    assert cache.get_or_compute("evaluate", {"n": 1}, lambda: pytest.fail("recomputed")) == (1, True)
    assert cache.get_or_compute("evaluate", {"n": 2}, lambda: 2) == (2, False)
    assert cache.work() == {"evaluate": {"reused": 1, "computed": 2}}
    assert cache.directory_for("sweep", {"n": 1}) != cache.directory_for("sweep", {"n": 2})
    entry = next(tmp_path.glob("evaluate-*.json")).read_text()
    assert code_version() in entry


# ---------------------------------------------------------------- training checkpoints (issue 17, item 4)
def test_a_planted_pickle_beside_the_output_is_never_loaded_by_a_fresh_harden_run(tmp_path):
    out = tmp_path / "hardened"
    marker = tmp_path / "code-ran"
    # Where an earlier moeguard kept the hidden checkpoint of `harden --out hardened`.
    torch.save(PlantedPickle(marker), tmp_path / ".hardened.harden-checkpoint.pt")
    report = harden_to_directory(char_moe(), [load_task("reverse", "train", limit=32)], [load_task("reverse", "test", limit=4)],
                                 defense_config("dispersion"), HardenSettings(steps=3, batch_size=4), out=out,
                                 permitted=["router"], progress=False)
    assert not marker.exists(), "a pickle beside the output was unpickled"
    assert report["harden"]["steps"] == 3 and (out / "config.json").is_file()


def test_a_training_checkpoint_is_safetensors_and_json_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    reference = char_moe()
    train(reference, task_batches(), steps=8, lr=1e-3, warmup=2, progress=False)
    checkpoint = tmp_path / "state"
    interrupt_at_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train(char_moe(), task_batches(), steps=8, lr=1e-3, warmup=2, progress=False, checkpoint=checkpoint,
              checkpoint_every=3)
    monkeypatch.undo()
    saved = sorted(p.suffix for p in checkpoint.rglob("*") if p.is_file())
    assert saved and set(saved) <= {".json", ".safetensors"}, saved  # nothing a loader would unpickle
    resumed = char_moe()
    result = train(resumed, task_batches(), steps=8, lr=1e-3, warmup=2, progress=False, checkpoint=checkpoint,
                   checkpoint_every=3)
    assert result.resumed_from == 6
    assert resumed.fingerprint() == reference.fingerprint()  # optimizer state and data order came back too


# ---------------------------------------------------------------- settings recorded, refused when they differ (item 7)
def test_realign_resumed_with_other_options_before_the_first_finished_round_is_refused(tmp_path, monkeypatch):
    data = builtin_data("reverse", pool_size=16, test_size=4, other_size=0, other_tasks=[])
    config = RealignConfig(budget=8, rounds=2, acquisition="random", scope="router", steps_per_round=4, batch_size=4)
    keep = {0: [0, 1, 2], 1: [3, 4, 5]}
    interrupt_at_step(monkeypatch, 3)  # in the first round, after its training checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        realign(char_moe(), data, config, keep=keep, out=tmp_path / "run", progress=False)
    monkeypatch.undo()
    for changed in (dict(lr=3e-3), dict(budget=6), dict(steps_per_round=6)):
        other = RealignConfig(**{**config.to_dict(), **changed})
        name, value = next(iter(changed.items()))
        with pytest.raises(ResumeError, match=f"started with other options: {name}=.* \\(now {value!r}\\)"):
            realign(char_moe(), data, other, keep=keep, out=tmp_path / "run", resume=True, progress=False)
    result = realign(char_moe(), data, config, keep=keep, out=tmp_path / "run", resume=True, progress=False)
    assert result.final.labels == 8


@pytest.mark.slow
def test_harden_killed_mid_run_and_rerun_with_another_method_and_lr_is_refused(tmp_path, monkeypatch):
    train_tasks, test_tasks = [load_task("reverse", "train", limit=32)], [load_task("reverse", "test", limit=4)]
    settings = HardenSettings(steps=205, batch_size=2, lr=1e-3)
    interrupt_at_step(monkeypatch, 203)  # after the checkpoint of step 200
    with pytest.raises(KeyboardInterrupt):
        harden_to_directory(char_moe(), train_tasks, test_tasks, defense_config("dispersion"), settings,
                            out=tmp_path / "hardened", permitted=["router"], progress=False)
    monkeypatch.undo()
    other = HardenSettings(steps=205, batch_size=2, lr=3e-3)
    with pytest.raises(ResumeError, match=r"lr=0\.001 \(now 0\.003\).*contribution=0\.0 \(now 1\.0\)"):
        harden_to_directory(char_moe(), train_tasks, test_tasks, defense_config("entangle"), other,
                            out=tmp_path / "hardened", permitted=["router"], progress=False)
    assert not (tmp_path / "hardened").exists()


def test_a_diverged_run_leaves_no_state_that_blocks_a_rerun(tmp_path):
    checkpoint = tmp_path / "state"

    def poisoned(model, batch, outputs):
        # Finite (zero) at every step, but the gradient of sqrt at 0 is infinite at the third: NaN weights after it.
        poisoned.calls += 1
        if poisoned.calls != 3:
            return outputs.logits.new_zeros(())
        return torch.sqrt((outputs.logits.sum() * 0).abs())

    poisoned.calls = 0
    with pytest.raises(MoeGuardError, match="lower the learning rate"):
        train(char_moe(), task_batches(), steps=6, lr=1e-3, extra_loss=poisoned, progress=False, checkpoint=checkpoint,
              checkpoint_every=3)
    rerun = char_moe()
    result = train(rerun, task_batches(), steps=6, lr=3e-4, progress=False, checkpoint=checkpoint, checkpoint_every=3)
    assert result.resumed_from == 0 and result.steps == 6
    assert all(torch.isfinite(p).all() for p in rerun.model.parameters())


# ---------------------------------------------------------------- the resume hint after Ctrl-C
@pytest.mark.slow
def test_the_hint_after_ctrl_c_is_a_command_that_resumes(tmp_path, monkeypatch, capsys):
    parent = char_moe().save(tmp_path / "parent")
    moe = load_moe(parent)
    moe.prune({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})
    pruned = moe.save(tmp_path / "pruned")
    data = tmp_path / "reverse.jsonl"
    save_jsonl(load_task("reverse", "pool", limit=24), data)
    argv = ["realign", "--model", str(pruned), "--data", str(data), "--budget", "6",
            "--rounds", "2", "--acquisition", "random", "--train", "router", "--steps-per-round", "4",
            "--batch-size", "2", "--out", str(tmp_path / "run")]
    interrupt_at_step(monkeypatch, 3)
    assert main(["-q", *argv]) == 130
    hint = capsys.readouterr().err
    monkeypatch.undo()
    command = shlex.split(hint.split("To resume, run: ", 1)[1].strip())
    assert command[0] == "moeguard" and "--resume" in command
    assert main(command[1:]) == 0
    assert load_moe(tmp_path / "run" / "model").num_experts == [4, 4]



def test_a_diverged_run_and_a_broken_invariant_are_reported_as_what_they_are(monkeypatch, capsys):
    from moeguard.errors import InternalError, TrainingDivergedError

    def diverges(args):
        raise TrainingDivergedError("the training loss became nan at step 3; training diverged, lower the learning rate.")

    def broken(args):
        raise InternalError("parameters outside the trainable scope changed during re-alignment")

    monkeypatch.setattr("moeguard.cli.inspect_command.run", diverges)
    assert main(["inspect", "--model", "x"]) == 2
    error = capsys.readouterr().err
    assert "error: the training loss became nan" in error and "Traceback" not in error
    monkeypatch.setattr("moeguard.cli.inspect_command.run", broken)
    assert main(["inspect", "--model", "x"]) == 3
    error = capsys.readouterr().err
    assert "Traceback" in error and "internal error (a bug in moeguard" in error
