"""Suspects: whatever answers prompts. A local model, a Python callable, or an HTTP endpoint.

A :class:`Suspect` turns a list of prompts (and a generation budget per prompt, in
tokens) into completions, by greedy decoding wherever the suspect lets us choose.
The verifier only ever sends prompts: it never shows a suspect the responses it
looks for.

The HTTP client speaks the OpenAI-compatible API that vLLM, TGI, llama.cpp's server,
Ollama and hosted services offer: ``POST /v1/completions`` with ``temperature 0``
(or ``/v1/chat/completions``, the prompt as the one user message, for services that
only chat). One request per prompt, each with a timeout; failures name the URL,
the status and what the server said.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moeguard.errors import InputError, ModelError
from moeguard.fields import setting
from moeguard.models.options import LoadOptions

MAX_RESPONSE_BYTES = 1 << 20
RETRY_STATUSES = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class EndpointOptions:
    """How an HTTP suspect is asked (see :func:`http_suspect`)."""

    model: str | None = setting(None, "model name sent to the server (default: the first one its /v1/models lists)")
    chat: bool = setting(False, "ask /v1/chat/completions, the prompt as the one user message (for chat-only services)")
    api_key_env: str | None = setting(None, "environment variable that holds the server's API key")
    timeout: float = setting(60.0, "seconds to wait for each answer")
    retries: int = setting(2, "retries of a request that failed on the network or with HTTP 429/5xx")


@dataclass
class Suspect:
    """Something to verify: ``complete(prompts, max_new_tokens) -> completions`` and a name for reports."""

    name: str
    complete: Callable[[Sequence[str], Sequence[int]], list[str]]


def first_line(text: str) -> str:
    """A completion as the verifier compares it: up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


# ---------------------------------------------------------------- local models
def local_suspect(model: Any, tokenizer: Any = None, *, batch_size: int = 64, name: str | None = None) -> Suspect:
    """A model in this process (an ``MoEModel`` or a transformers causal LM): batched greedy decoding.

    Masks, adapters or anything else active on the model when ``complete`` runs apply.
    """
    from moeguard.data.batching import encode_prompts
    from moeguard.eval.evaluate import causal_lm, eval_mode, greedy_generate, length_sorted_chunks, prediction_text

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("a local suspect needs its tokenizer; the model has none saved with it, pass `tokenizer`.",
                         arguments=("tokenizer",))
    lm = causal_lm(model)

    def complete(prompts: Sequence[str], max_new_tokens: Sequence[int]) -> list[str]:
        encoded = encode_prompts(tokenizer, list(prompts))
        completions = [""] * len(encoded)
        with eval_mode(lm):
            for chunk in length_sorted_chunks([len(p) for p in encoded], batch_size):
                budget = max(max_new_tokens[i] for i in chunk)
                generated = greedy_generate(lm, tokenizer, [encoded[i] for i in chunk], max_new_tokens=budget)
                for i, tokens in zip(chunk, generated):
                    completions[i] = prediction_text(tokenizer, tokens[: max_new_tokens[i]])
        return completions

    return Suspect(name or str(getattr(model, "source", None) or type(lm).__name__), complete)


def callable_suspect(function: Callable[[str], str], *, name: str | None = None) -> Suspect:
    """A Python function ``prompt -> completion`` (called once per prompt; the budget is not passed)."""
    if not callable(function):
        raise InputError(f"a suspect `function` must be callable (prompt -> completion), got {type(function).__name__}.",
                         arguments=("function",))

    def complete(prompts: Sequence[str], max_new_tokens: Sequence[int]) -> list[str]:
        completions = []
        for prompt in prompts:
            text = function(prompt)
            if not isinstance(text, str):
                raise InputError(f"the suspect function returned {type(text).__name__} for a prompt; it must return the completion text.")
            completions.append(text)
        return completions

    return Suspect(name or getattr(function, "__name__", "callable"), complete)


# ---------------------------------------------------------------- HTTP endpoints
def endpoint_url(url: str, *, chat: bool = False) -> str:
    """The completions URL of ``url``: kept if it ends in ``/completions``, else ``/v1/completions``
    (``/v1/chat/completions`` with ``chat``) appended to the base (``/v1`` not repeated)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"url={url!r} is not an http(s) URL; give the server as e.g. http://127.0.0.1:8000 or "
                         ".../v1/completions.", arguments=("url",))
    path = parts.path.rstrip("/")
    if not path.endswith("/completions"):
        tail = "chat/completions" if chat else "completions"
        path = f"{path}/{tail}" if path.endswith("/v1") else f"{path}/v1/{tail}"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _request(url: str, payload: dict[str, Any] | None, *, api_key: str | None, timeout: float, retries: int) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read(MAX_RESPONSE_BYTES + 1)
            break
        except urllib.error.HTTPError as error:
            detail = error.read(2000).decode("utf-8", "replace").strip()
            if error.code in RETRY_STATUSES and attempt < retries:
                time.sleep(0.5 * 2**attempt)
                continue
            raise ModelError(f"{url} answered HTTP {error.code} {error.reason}: {detail[:300] or 'no detail'}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            if attempt < retries:
                time.sleep(0.5 * 2**attempt)
                continue
            reason = getattr(error, "reason", error)
            raise ModelError(f"cannot reach {url}: {reason}; is the server running and the URL right?") from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise ModelError(f"{url} sent more than {MAX_RESPONSE_BYTES} bytes for one completion; is it the right endpoint?")
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise ModelError(f"{url} did not answer with JSON (got {body[:120]!r}); is it an OpenAI-compatible endpoint?") from None


def _completion_text(answer: Any, url: str, chat: bool) -> str:
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
    except (KeyError, IndexError, TypeError):
        field = "choices[0].message.content" if chat else "choices[0].text"
        raise ModelError(f"{url} answered without {field}: {json.dumps(answer)[:200]}") from None
    if not isinstance(text, str):
        raise ModelError(f"{url}: the completion text is {type(text).__name__}, not a string.")
    return text


def served_model_name(base_url: str, *, api_key: str | None = None, timeout: float = 30.0) -> str | None:
    """The first model id ``GET /v1/models`` lists, or None if the server does not say."""
    parts = urllib.parse.urlsplit(base_url)
    path = parts.path.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if not path.endswith("/v1"):
        path += "/v1"
    url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"{path}/models", "", ""))
    try:
        listing = _request(url, None, api_key=api_key, timeout=timeout, retries=0)
        return str(listing["data"][0]["id"])
    except (ModelError, KeyError, IndexError, TypeError):
        return None


def http_suspect(url: str, options: EndpointOptions = EndpointOptions()) -> Suspect:
    """An OpenAI-compatible server at ``url``, asked greedily (``temperature 0``) one prompt at a time.

    ``options.model`` defaults to the first one the server lists (``/v1/models``); the
    API key is read from the environment variable ``options.api_key_env``.
    """
    chat = options.chat or url.rstrip("/").endswith("/chat/completions")
    target = endpoint_url(url, chat=chat)
    api_key = None
    if options.api_key_env:
        api_key = os.environ.get(options.api_key_env)
        if api_key is None:
            raise InputError(f"the environment variable {options.api_key_env} (api_key_env, the API key) is not set.",
                             arguments=("api_key_env",))
    if not options.timeout > 0 or options.retries < 0:
        raise InputError(f"need timeout > 0 and retries >= 0, got timeout={options.timeout!r}, retries={options.retries!r}.",
                         arguments=("timeout", "retries"))
    name = options.model or served_model_name(target, api_key=api_key, timeout=options.timeout) or "default"

    def complete(prompts: Sequence[str], max_new_tokens: Sequence[int]) -> list[str]:
        completions = []
        for prompt, budget in zip(prompts, max_new_tokens):
            payload: dict[str, Any] = {"model": name, "max_tokens": int(budget), "temperature": 0, "top_p": 1, "n": 1}
            if chat:
                payload["messages"] = [{"role": "user", "content": prompt}]
            else:
                payload["prompt"] = prompt
            answer = _request(target, payload, api_key=api_key, timeout=options.timeout, retries=options.retries)
            completions.append(_completion_text(answer, target, chat))
        return completions

    return Suspect(f"{target} (model {name})", complete)


def resolve_suspect(suspect: Any, *, loading: LoadOptions | None = None, endpoint: EndpointOptions | None = None) -> Suspect:
    """A :class:`Suspect` from a Suspect, a URL (asked with ``endpoint``), a loaded model, a callable, or a
    model directory or hub id (any causal LM, MoE or dense, loaded with ``loading``)."""
    if isinstance(suspect, Suspect):
        return suspect
    if isinstance(suspect, str) and suspect.startswith(("http://", "https://")):
        return http_suspect(suspect, endpoint or EndpointOptions())
    if isinstance(suspect, (str, os.PathLike)):
        from moeguard.zoo import resolve_model_source

        model, tokenizer = (loading or LoadOptions()).load_causal_lm(resolve_model_source(str(suspect)))
        return local_suspect(model, tokenizer, name=str(suspect))
    if hasattr(suspect, "generate") or hasattr(suspect, "layers"):
        return local_suspect(suspect)
    if callable(suspect):
        return callable_suspect(suspect)
    raise InputError(
        f"cannot verify a {type(suspect).__name__}: give as `suspect` a model directory or hub id, an http(s) URL of an "
        "OpenAI-compatible server, a loaded model, or a function prompt -> completion.", arguments=("suspect",)
    )
