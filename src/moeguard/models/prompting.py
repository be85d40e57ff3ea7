"""How prompts are written for a model: the setting every stage that encodes prompts reads from the model."""

from __future__ import annotations

from dataclasses import dataclass

from moeguard.errors import InputError

CHAT_TEMPLATE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class PromptFormat:
    """Prompts go through the tokenizer's chat template (``"auto"``: when it has one; ``"on"``: required;
    ``"off"``: never), with ``system_prompt`` as the system message (without a template: as a first
    paragraph). :func:`moeguard.data.batching.encode_prompts` applies it; every stage reads it from
    :attr:`moeguard.models.MoEModel.prompt_format`, so evaluation, attribution and re-alignment see the
    same prompts."""

    chat_template: str = "auto"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise InputError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {self.chat_template!r}.",
                             arguments=("chat_template",))

    def uses_template(self, tokenizer) -> bool:
        """Whether prompts for ``tokenizer`` are written through its chat template (refused for "on" without one)."""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template == "on" and not has_template:
            raise InputError("chat_template='on', but the tokenizer has no chat template; use chat_template='auto' or "
                             "'off' (or a tokenizer that has one).", arguments=("chat_template",))
        return self.chat_template == "on" or (self.chat_template == "auto" and has_template)
