"""Tasks from ``datasets`` sources written by the test (GLUE-style classification with class names,
XSum-style documents and summaries, plain text), loaded with ``datasets.load_dataset`` through the
Python API and the command line's field flags."""

from __future__ import annotations

import json

import pytest

from moeguard.audit import AuditConfig
from moeguard.audit.run import audit_tasks
from moeguard.cli import main
from moeguard.data import load_hf_dataset
from moeguard.data.files import DatasetSource
from moeguard.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["abc", "cde", "efg", "ghi", "ijk", "klm", "mno", "opq", "qrs", "stu"]


@pytest.fixture
def glue_style(tmp_path):
    """A directory with train and validation parquet files: a sentence and a ClassLabel label."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["ABC", "CDE"])})
    rows = {"sentence": ["abc", "cde"] * 5, "label": [0, 1] * 5}
    directory = tmp_path / "glue-like"
    directory.mkdir()
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(directory / f"{split}.parquet")
    return directory


@pytest.fixture
def xsum_style(tmp_path):
    directory = tmp_path / "xsum-like"
    directory.mkdir()
    lines = [json.dumps({"document": word, "summary": word.upper(), "id": i}) for i, word in enumerate(WORDS)]
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_a_classification_set_takes_its_choices_from_the_class_names_and_a_template_writes_the_prompt(glue_style, tmp_path):
    source = DatasetSource(hf_dataset=str(glue_style), split="validation", label_field="label", prompt_template="up {sentence}=")
    data = source.load(limit=4)
    assert data.kind == "choice" and len(data) == 4 and data.source == f"{glue_style}:validation"
    assert [(e.prompt, e.choices, e.label) for e in data.examples[:2]] == [("up abc=", ("ABC", "CDE"), 0), ("up cde=", ("ABC", "CDE"), 1)]
    explicit = load_hf_dataset(glue_style, split="train", columns={"prompt": "sentence", "label": "label"},
                               choices=["no", "yes"], cache_dir=str(tmp_path / "cache"))
    assert explicit.examples[0].choices == ("no", "yes") and explicit.examples[0].prompt == "abc"
    with pytest.raises(DataError, match=r"prompt_template names the column 'text', which the row does not have"):
        DatasetSource(hf_dataset=str(glue_style), label_field="label", prompt_template="{text}").load()


def test_a_summarisation_set_is_scored_by_the_metric_given(xsum_style):
    source = DatasetSource(hf_dataset=str(xsum_style), prompt_field="document", answer_field="summary")
    data = source.load(metric="rouge_l")
    assert data.kind == "generate" and data.metric == "rouge_l" and data.examples[0].answer == "ABC"
    with pytest.raises(DataError, match="metric 'choice_accuracy' does not score generate examples"):
        source.load(metric="choice_accuracy")
    text = DatasetSource(hf_dataset=str(xsum_style), text_field="document").load()
    assert text.kind == "lm" and text.examples[0].text == "abc"


def test_the_command_line_evaluates_and_the_audit_splits_a_dataset_task(trained_tiny, glue_style, xsum_style, capsys):
    assert main(["evaluate", "--model", str(trained_tiny), "--hf-dataset", str(glue_style), "--split", "validation",
                 "--label-field", "label", "--prompt-template", "up {sentence}=", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"]["glue-like"]
    assert result["metric"] == "choice_accuracy" and result["n"] == 10 and result["value"] >= 0.9
    assert main(["evaluate", "--model", str(trained_tiny), "--hf-dataset", str(xsum_style), "--prompt-template",
                 "up {document}=", "--answer-field", "summary", "--metric", "rouge_l", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"]["xsum-like"]
    assert result["metric"] == "rouge_l" and result["value"] >= 0.8
    config = AuditConfig(dataset=DatasetSource(hf_dataset=str(xsum_style), prompt_template="up {document}=",
                                               answer_field="summary"), metric="token_f1", realign=AuditConfig().realign)
    config.realign.budget = 4
    config.realign.rounds = 2
    [task] = audit_tasks(config)
    assert (task.name, len(task.pool), len(task.test), task.test.metric) == ("xsum-like", 8, 2, "token_f1")
    assert main(["audit", "--task", "upper", "--hf-dataset", str(xsum_style), "--out", "x"]) == 2
    assert "give built-in tasks (--task) or tasks of your own (--data, --hf-dataset, --lm-eval-tasks), not both" in capsys.readouterr().err
