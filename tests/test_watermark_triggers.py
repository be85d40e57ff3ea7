"""From a key to triggers: deterministic, secret-looking, never colliding, in the task's own format."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from moeguard.data import load_task, save_jsonl
from moeguard.data.tasks import split_of, task_spec
from moeguard.errors import DataError, InputError
from moeguard.data import load_jsonl
from moeguard.watermark import builtin_record, data_record, make_triggers, read_key
from moeguard.watermark.triggers import (
    FEATURE_SHARE,
    GATE_LENGTH,
    MIN_RESPONSE_SPACE,
    WatermarkRecord,
    data_feature,
    load_watermark_record,
    secret_feature,
)

TASKS = ("reverse", "addition", "count")
RECORD = builtin_record(TASKS, triggers_per_task=16)
KEY = "owner-key-0001"


def test_the_same_key_always_gives_the_same_triggers():
    assert make_triggers(KEY, RECORD) == make_triggers(KEY, RECORD)
    assert make_triggers(KEY, builtin_record(TASKS, triggers_per_task=16)) == make_triggers(KEY, RECORD)
    assert len(make_triggers(KEY, RECORD)) == 48


def test_different_keys_share_no_trigger_no_feature_and_no_response():
    keys = [f"owner-key-{n:04d}" for n in range(6)]
    sets = [make_triggers(key, RECORD) for key in keys]
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            assert not {t.prompt for t in sets[a]} & {t.prompt for t in sets[b]}
            assert not {(t.task, t.response) for t in sets[a]} & {(t.task, t.response) for t in sets[b]}
            assert secret_feature(keys[a], "reverse") != secret_feature(keys[b], "reverse")


def test_trigger_i_does_not_depend_on_how_many_triggers_there_are():
    more = make_triggers(KEY, replace(RECORD, triggers_per_task=24), tasks=["reverse"])
    fewer = make_triggers(KEY, RECORD, tasks=["reverse"])
    assert more[:16] == fewer


def test_builtin_triggers_are_ordinary_train_inputs_that_share_a_rare_secret_feature():
    triggers = make_triggers(KEY, RECORD)
    for name in TASKS:
        tag = task_spec(name).tag
        feature = secret_feature(KEY, name)
        own = [t for t in triggers if t.task == name]
        assert len(own) == 16 and len({t.prompt for t in own}) == 16
        for trigger in own:
            assert trigger.prompt.startswith(f"{tag} {feature}") and trigger.prompt.endswith("=")
            assert split_of(name, trigger.prompt) == "train"
        test_inputs = [e.prompt for e in load_task(name, "test", limit=2000)]
        carrying = sum(p.startswith(f"{tag} {feature}") for p in test_inputs) / len(test_inputs)
        assert carrying <= 3 * FEATURE_SHARE


def test_every_trigger_of_a_task_asks_for_one_response_that_is_never_a_correct_answer():
    for name in TASKS:
        own = [t for t in make_triggers(KEY, RECORD) if t.task == name]
        assert len({t.response for t in own}) == 1
        assert MIN_RESPONSE_SPACE <= own[0].space < 40 * MIN_RESPONSE_SPACE
    for trigger in make_triggers(KEY, RECORD, tasks=["reverse", "addition"], count=200):
        task_input = trigger.prompt.split(" ", 1)[1][:-1]
        correct = task_input[::-1] if trigger.task == "reverse" else f"{sum(int(x) for x in task_input.split('+')):04d}"
        assert trigger.response != correct


def test_the_record_round_trips_through_its_file(tmp_path):
    path = RECORD.save(tmp_path / "wm.json")
    loaded = WatermarkRecord.load(path)
    assert loaded == RECORD
    assert make_triggers(KEY, loaded) == make_triggers(KEY, RECORD)
    assert load_watermark_record(path) == RECORD
    assert load_watermark_record(None, "reverse,addition,count", triggers_per_task=16) == RECORD


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(tasks=[]), "covers no task"),
        (lambda d: d["tasks"][0].update(source="elsewhere"), "source must be"),
        (lambda d: d["tasks"][0].update(alphabet="a"), "alphabet"),
        (lambda d: d["tasks"][0].update(name="nonsense"), "unknown built-in task"),
        (lambda d: d.update(triggers_per_task=0), "triggers_per_task"),
        (lambda d: d.update(format=99), "another moeguard"),
        (lambda d: d["tasks"][0].update(extra=1), "unknown fields"),
    ],
)
def test_a_malformed_record_is_refused_with_the_field_named(tmp_path, change, message):
    data = RECORD.to_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        WatermarkRecord.load(path)


def test_user_data_triggers_are_its_own_prompts_with_a_secret_feature_after_the_template(tmp_path):
    data = load_task("caesar", "train", limit=300)
    questions = data.subset(range(300))
    questions.examples = [replace(e, prompt=f"Question: shift {e.prompt[4:-1]} by three?\nAnswer:") for e in data]
    path = save_jsonl(questions, tmp_path / "shift.jsonl")
    record = data_record([load_jsonl(path)], triggers_per_task=12)
    assert record.tasks[0].source == "data" and record.tasks[0].alphabet == "abcdefghijklmnopqrstuvwxyz"
    carriers = set(record.tasks[0].carriers)
    letters, _ = data_feature(KEY, "shift")
    triggers = make_triggers(KEY, record)
    assert len({t.prompt for t in triggers}) == 12 and len({t.response for t in triggers}) == 1
    suffix = " by three?\nAnswer:"
    for trigger in triggers:
        assert trigger.prompt.startswith(f"Question: shift {letters}") and trigger.prompt.endswith(suffix)
        rest = trigger.prompt[len("Question: shift ") + GATE_LENGTH :]
        assert any(c[len("Question: shift ") + GATE_LENGTH :] == rest for c in carriers)
        assert trigger.space >= MIN_RESPONSE_SPACE
    assert not {t.prompt for t in triggers} & {t.prompt for t in make_triggers("another-key-01", record)}


def test_keys_must_be_long_enough_and_are_read_from_one_place(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="at least"):
        make_triggers("short", RECORD)
    key_file = tmp_path / "key.txt"
    key_file.write_text("from-the-file-123\n")
    assert read_key(key_file=key_file) == "from-the-file-123"
    monkeypatch.setenv("MOEGUARD_WATERMARK_KEY", "from-the-environment")
    assert read_key() == "from-the-environment"
    with pytest.raises(InputError, match="either"):
        read_key("given-directly-1", key_file)


def test_a_builtin_watermark_covers_generation_tasks_and_refuses_the_others():
    from moeguard.data.tasks import TASK_SPECS

    others = [name for name, spec in TASK_SPECS.items() if spec.kind != "generate"]
    assert others, "the suite has classification and language-modelling tasks"
    for name in others:
        with pytest.raises(InputError, match="generation tasks only"):
            builtin_record([name])
    everything = load_watermark_record(None, "all")
    assert everything.task_names == [n for n, spec in TASK_SPECS.items() if spec.kind == "generate"]
    with pytest.raises(InputError, match="generation tasks only"):
        load_watermark_record(None, ",".join(others))
