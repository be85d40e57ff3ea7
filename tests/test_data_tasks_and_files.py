"""The built-in task suite and user data files: splits, determinism, the JSONL contract, validation."""

from __future__ import annotations

import json
import math

import pytest

from moeguard.data import BUILTIN_TASKS, Example, TaskData, load_hf_dataset, load_jsonl, load_task, mixture, save_jsonl
from moeguard.data.tasks import DYCK_DEPTH, DYCK_MAX_LENGTH, DYCK_MIN_LENGTH, FILLERS, TOPICS, dyck_log_prob, split_of
from moeguard.errors import DataError, InputError


def key(example: Example) -> str:
    return example.text if example.text is not None else example.prompt


def test_there_are_tasks_of_every_type_each_with_its_own_tag_and_first_letter():
    assert len(BUILTIN_TASKS) >= 9
    assert {load_task(name, limit=1).kind for name in BUILTIN_TASKS} == {"generate", "choice", "lm"}
    tags = {key(load_task(name, limit=1).examples[0]).split(" ")[0] for name in BUILTIN_TASKS}
    assert len(tags) == len(BUILTIN_TASKS)
    # the language-modelling text's first character tells its task from every other (its tag is predictable)
    firsts = [tag[0] for tag in tags]
    assert firsts.count("d") == 1


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_train_pool_and_test_prompts_are_disjoint_and_unique(name):
    splits = {split: [key(e) for e in load_task(name, split)] for split in ("train", "pool", "test")}
    assert [len(p) for p in splits.values()] == [20_000, 2_000, 200]
    for prompts in splits.values():
        assert len(set(prompts)) == len(prompts)
    assert not set(splits["test"]) & set(splits["train"])
    assert not set(splits["test"]) & set(splits["pool"])
    assert not set(splits["pool"]) & set(splits["train"])
    # disjoint for every seed: a prompt's split depends on the prompt alone
    other_seed_train = {key(e) for e in load_task(name, "train", seed=1, limit=5_000)}
    assert not set(splits["test"]) & other_seed_train
    assert all(split_of(name, p) == "test" for p in splits["test"])


def majority_topic(phrase: str) -> str:
    counts = {topic: sum(word in words for word in phrase.split()) for topic, words in TOPICS.items()}
    return max(counts, key=counts.get)


def balanced(text: str) -> bool:
    stack = []
    for character in text:
        if character in "([":
            stack.append(character)
        elif character in ")]" and (not stack or "([".index(stack.pop()) != ")]".index(character)):
            return False
    return not stack


def test_answers_are_right():
    checks = {
        "addition": lambda x: f"{sum(int(v) for v in x.split('+')):04d}",
        "reverse": lambda x: x[::-1],
        "sort": lambda x: "".join(sorted(x)),
        "caesar": lambda x: "".join(chr((ord(c) - 97 + 3) % 26 + 97) for c in x),
        "upper": str.upper,
        "count": lambda x: str(x.split(" in ")[1].count(x[0])),
        "topic": majority_topic,
        "keywords": lambda x: " ".join(word for word in x.split() if word not in FILLERS),
    }
    for name, check in checks.items():
        for example in load_task(name, limit=50).examples:
            task_input = example.prompt.split(" ", 1)[1].removesuffix("=")
            assert example.target == check(task_input), (name, example)
    texts = [e.text for e in load_task("dyck", limit=200)]
    assert set(checks) | {"dyck"} == set(BUILTIN_TASKS)
    for text in texts:
        body = text.removeprefix("dyck ")
        assert body.endswith(".") and balanced(body) and DYCK_MIN_LENGTH < len(body) <= DYCK_MAX_LENGTH + DYCK_DEPTH + 1
        assert all(math.isfinite(v) and v <= 0 for v in dyck_log_prob(body))
    assert load_task("keywords").metric == "rouge_l" and load_task("topic").kind == "choice"


def test_the_bracket_process_log_probabilities_are_those_it_draws_with():
    # after "(" at depth 1 of a short text: open either kind (1/4 each) or close (1/2)
    assert dyck_log_prob("((") == pytest.approx([math.log(0.5), math.log(0.25)])
    assert dyck_log_prob("()") == pytest.approx([math.log(0.5), math.log(0.5)])
    assert dyck_log_prob("(]") == [math.log(0.5), -math.inf]
    # at depth DYCK_DEPTH the innermost bracket must close
    assert dyck_log_prob("[" * DYCK_DEPTH + "]")[-1] == 0.0
    # a text may end only once it is DYCK_MIN_LENGTH long, and then ends with probability 1/2
    early, late = "()" * (DYCK_MIN_LENGTH // 2 - 1), "()" * (DYCK_MIN_LENGTH // 2)
    assert dyck_log_prob(early + ".")[-1] == -math.inf and dyck_log_prob(late + ".")[-1] == pytest.approx(math.log(0.5))


def test_same_seed_same_examples_other_seed_other_examples_and_limit_is_a_prefix():
    first = load_task("addition", "pool", seed=3)
    assert load_task("addition", "pool", seed=3).examples == first.examples
    assert load_task("addition", "pool", seed=4).examples != first.examples
    assert load_task("addition", "pool", seed=3, limit=17).examples == first.examples[:17]
    assert load_task("addition", "pool", limit=5000, seed=3).examples[:2000] == first.examples


def test_unknown_task_and_split_and_bad_limit_are_refused_with_the_valid_values():
    with pytest.raises(InputError, match="unknown built-in task 'addtion'; valid tasks: addition, reverse, sort"):
        load_task("addtion")
    with pytest.raises(InputError, match="unknown split 'validation'; valid splits: train, pool, test"):
        load_task("addition", "validation")
    with pytest.raises(InputError, match="limit must be a positive integer, got 0"):
        load_task("addition", limit=0)


def test_export_and_load_round_trip_in_all_three_formats(tmp_path):
    datas = [
        load_task("reverse", "test", limit=20),
        TaskData("mc", "choice", [Example(prompt="2+2=", choices=("3", "4", "5"), label=1)], "memory"),
        TaskData("text", "lm", [Example(text="a line of text"), Example(text="another")], "memory"),
    ]
    for data in datas:
        path = save_jsonl(data, tmp_path / f"{data.name}.jsonl")
        loaded = load_jsonl(path)
        assert (loaded.name, loaded.kind, loaded.examples, loaded.source) == (data.name, data.kind, data.examples, str(path))
    assert json.loads((tmp_path / "mc.jsonl").read_text()) == {"prompt": "2+2=", "choices": ["3", "4", "5"], "label": 1}


BAD_LINES = [
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": "b"\n', r"bad\.jsonl line 2: not valid JSON"),
    ('{"prompt": "a"}\n', r"bad\.jsonl line 1: missing field 'answer'"),
    ('{"answer": "b"}\n', r"bad\.jsonl line 1: missing field 'prompt'"),
    ('{"prompt": "a", "answer": 3}\n', r"line 1: field 'answer' must be a string, got int 3"),
    ('{"prompt": ["a"], "answer": "b"}\n', r"line 1: field 'prompt' must be a string, got array"),
    ('{"prompt": "a", "choices": ["x", "y"], "label": 2}\n', r"line 1: field 'label' is 2, but it must index 'choices' \(0\.\.1\)"),
    ('{"prompt": "a", "choices": ["x", "y"], "label": "0"}\n', r"line 1: field 'label' must be an integer, got string"),
    ('{"prompt": "a", "choices": ["x", 1], "label": 0}\n', r"line 1: field 'choices' item 1 must be a string, got int"),
    ('{"prompt": "a", "choices": [], "label": 0}\n', r"line 1: field 'choices' is empty"),
    ('{"prompt": "a", "choices": ["x", "y"]}\n', r"line 1: missing field 'label'"),
    ('{"prompt": "a", "choices": ["x"], "label": 0}\n', r"line 1: field 'choices' is a single choice; give at least two"),
    ('{"metric": "rouge_l"}\n{"text": "t"}\n', r"line 1: metric 'rouge_l' does not score lm examples; choose one of loss"),
    ('{"metric": "rogue"}\n{"prompt": "a", "answer": "b"}\n', r"line 1: metric 'rogue' does not score generate"),
    ('{"metric": "rouge_l", "scale": 2}\n{"prompt": "a", "answer": "b"}\n', r"line 1: unknown header field\(s\) \['scale'\]"),
    ('{"answer_pattern": "(unclosed"}\n{"prompt": "a", "answer": "b"}\n', r"line 1: answer_pattern '\(unclosed' is not a regular"),
    ('{"answer_pattern": "x"}\n{"prompt": "a", "choices": ["x", "y"], "label": 0}\n', r"line 1: answer_pattern extracts"),
    ('{"text": null}\n', r"line 1: field 'text' must be a string, got null"),
    ('["a", "b"]\n', r"line 1: expected a JSON object, got array"),
    ('{"text": "t"}\n\n{"prompt": "a", "answer": "b"}\n', r"line 3: this is a generate example, but .*line 1 is a lm example"),
    ("\n\n", r"holds no examples"),
]


@pytest.mark.parametrize("content, message", BAD_LINES)
def test_malformed_jsonl_is_reported_with_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_jsonl(path)


def test_missing_and_non_utf8_files_are_reported(tmp_path):
    with pytest.raises(DataError, match="data file .*nowhere.jsonl does not exist"):
        load_jsonl(tmp_path / "nowhere.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="latin.jsonl is not UTF-8 text"):
        load_jsonl(tmp_path / "latin.jsonl")


def test_an_empty_task_cannot_be_exported_and_tasks_of_several_kinds_mix_only_for_training(tmp_path):
    with pytest.raises(DataError, match="has no examples"):
        save_jsonl(TaskData("empty", "generate", [], ""), tmp_path / "e.jsonl")
    with pytest.raises(DataError, match="example 0 is a lm example but the task holds generate examples"):
        TaskData("x", "generate", [Example(text="t")])
    mixed = mixture([load_task("upper", limit=2), TaskData("t", "lm", [Example(text="t")])])
    assert len(mixed) == 3 and mixed.kind == "mixed"
    one_kind = mixture([load_task("upper", limit=2), load_task("count", limit=3)])
    assert len(one_kind) == 5 and one_kind.kind == "generate"


def test_datasets_sources_load_with_a_column_mapping(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "q1", "solution": "s1", "id": 1}\n{"question": "q2", "solution": "s2", "id": 2}\n')
    (tmp_path / "mc.csv").write_text("text\nhello world\nbye\n")
    qa = load_hf_dataset(tmp_path / "qa.jsonl", columns={"prompt": "question", "answer": "solution"})
    assert qa.kind == "generate" and [e.answer for e in qa] == ["s1", "s2"]
    lm = load_hf_dataset(tmp_path / "mc.csv", limit=1)
    assert lm.kind == "lm" and [e.text for e in lm] == ["hello world"]
    with pytest.raises(DataError, match=r"has no column\(s\) \['answer'\]; its columns are \['question', 'solution', 'id'\]"):
        load_hf_dataset(tmp_path / "qa.jsonl", columns={"prompt": "question", "answer": "answer"})
    with pytest.raises(DataError, match=r"row 0 \(its columns are \['question', 'solution', 'id'\]; map them with columns=\): missing field 'prompt'"):
        load_hf_dataset(tmp_path / "qa.jsonl")
    with pytest.raises(DataError, match="cannot load dataset 'nobody/no-such-dataset'"):
        load_hf_dataset("nobody/no-such-dataset")
