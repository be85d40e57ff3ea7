"""The free teacher: whoever holds the weights has the full model answer any prompt.

The carver's training data are prompts labelled by the full model (greedy answers for
generation tasks, the highest-likelihood choice for multiple choice), and its
distillation loss reads the full model's logits at the answer tokens. The teacher is
never trained; what it costs (a forward pass per labelled token, another per token
distilled) is counted by :mod:`moeguard.attack.curves`.
"""

from __future__ import annotations

from typing import Any

import torch

from moeguard.data import Example, TaskData, model_inputs, to_device
from moeguard.data.batching import encode_continuations
from moeguard.errors import DataError
from moeguard.eval import evaluate
from moeguard.eval.evaluate import ANSWER_TOKEN_MARGIN, causal_lm, device_of
from moeguard.models import MoEModel
from moeguard.realign.acquisition import answer_logits, answer_predictors
from moeguard.realign.pool import accepts_logits_to_keep

TEACHER_KINDS = ("generate", "choice")


def check_teachable(data: TaskData) -> None:
    """Refuse data the teacher cannot label with an answer (plain text has none to imitate)."""
    if data.kind not in TEACHER_KINDS:
        raise DataError(
            f"task {data.name!r} holds {data.kind} examples; the head start is measured on tasks with answers "
            "({'prompt', 'answer'} or {'prompt', 'choices', 'label'})."
        )


def teacher_answers(teacher: MoEModel, prompts: TaskData, *, batch_size: int = 256) -> list[Any]:
    """The teacher's answer to every prompt: generated text (generate) or the index of its choice (choice).

    Generation runs up to eos within the longest reference answer plus a margin, so a
    prompt's label never depends on its own reference answer.
    """
    check_teachable(prompts)
    result = evaluate(teacher, teacher.tokenizer, prompts, batch_size=batch_size,
                      max_new_tokens=_generation_budget(teacher, prompts) if prompts.kind == "generate" else None)
    if prompts.kind == "generate":
        return list(result.predictions)
    return [example.choices.index(choice) for example, choice in zip(prompts, result.predictions)]


def _generation_budget(teacher: MoEModel, prompts: TaskData) -> int:
    answers = [e.answer for e in prompts if e.answer]
    lengths = [len(ids) for ids in encode_continuations(teacher.tokenizer, answers, eos=False)]
    return max(lengths, default=8) + ANSWER_TOKEN_MARGIN


def labelled(prompts: TaskData, answers: list[Any], source: str) -> TaskData:
    """``prompts`` with the teacher's ``answers`` in place of their own."""
    if len(answers) != len(prompts):
        raise DataError(f"{len(answers)} teacher answers for {len(prompts)} prompts of {prompts.name!r}.")
    if prompts.kind == "generate":
        examples = [Example(prompt=e.prompt, answer=str(a)) for e, a in zip(prompts, answers)]
    else:
        examples = [Example(prompt=e.prompt, choices=e.choices, label=int(a)) for e, a in zip(prompts, answers)]
    return TaskData(prompts.name, prompts.kind, examples, source)


def answer_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``mean_t KL(p_T,t || p_S,t) = mean_t sum_v p_T,t(v) (log p_T,t(v) - log p_S,t(v))`` over ``[N, V]`` logits.

    Both are taken at the N positions that predict answer tokens; the teacher side
    carries no gradient.
    """
    teacher_log = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    student_log = torch.log_softmax(student_logits.float(), dim=-1)
    terms = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
    return terms.mean() if terms.numel() else student_logits.new_zeros(())


def state_distance(hidden: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_t m_t ||h_t - r_t||^2 / sum_t m_t ||r_t||^2`` over the tokens ``m`` (``[B, T, H]`` states, ``[B, T]`` mask)."""
    weights = mask.to(hidden.device, torch.float32).unsqueeze(-1)
    reference = reference.to(hidden.device).float()
    error = ((hidden.float() - reference) ** 2 * weights).sum()
    return error / ((reference ** 2) * weights).sum().clamp_min(1e-12)


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """The mean :func:`state_distance` over the decoder layers' outputs (``hidden_states[1:]``), which must pair up."""
    if len(student) != len(teacher):
        raise DataError(f"the student has {len(student) - 1} decoder layers and the teacher {len(teacher) - 1}; "
                        "hidden-state distillation pairs them one to one.")
    return torch.stack([state_distance(s, t, mask) for s, t in zip(student[1:], teacher[1:])]).mean()


class Distillation:
    """``extra_loss`` for :func:`moeguard.training.train`: ``weight * answer_kl`` against the teacher's logits, plus
    with ``hidden`` the :func:`hidden_state_loss` of every decoder layer's output (same widths, same depth).

    The teacher runs once per training batch without gradient, keeping only the logits
    that predict answer tokens where the model supports ``logits_to_keep``. It must not
    share weights with the student (a carve is a copy: :func:`moeguard.attack.students.carve`).
    """

    def __init__(self, teacher: MoEModel, weight: float = 1.0, *, hidden: bool = False) -> None:
        self.teacher = teacher
        self.weight = weight
        self.needs_hidden_states = hidden  # read by the training loop
        self._restrict = accepts_logits_to_keep(causal_lm(teacher))

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        lm = causal_lm(self.teacher)
        answer_mask = batch["answer_mask"]
        with torch.no_grad():
            inputs = to_device(model_inputs(batch), device_of(lm))
            extra = {"logits_to_keep": answer_predictors(answer_mask).to(device_of(lm))} if self._restrict else {}
            taught = lm(**inputs, **extra, output_hidden_states=self.needs_hidden_states)
        device = outputs.logits.device
        teacher_logits, _ = answer_logits(taught.logits.to(device), answer_mask.to(device))
        student_logits, _ = answer_logits(outputs.logits, answer_mask.to(device))
        loss = answer_kl(student_logits, teacher_logits)
        if self.needs_hidden_states:
            loss = loss + hidden_state_loss(outputs.hidden_states, taught.hidden_states, batch["attention_mask"])
        return self.weight * loss
