"""A small OpenAI-compatible completion server for a local model (greedy decoding).

Serves ``POST /v1/completions`` (``prompt`` a string or a list of strings),
``POST /v1/chat/completions`` (the last user message is the prompt, no chat
template) and ``GET /v1/models``, so a model can be checked the way a deployed
service is, by :func:`moeguard.watermark.suspects.http_suspect`. Requests are
bounded (body size, prompts per request, tokens per completion) and answered one
at a time. Meant for local checks and tests: it binds to 127.0.0.1 by default and
has no authentication.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from moeguard.watermark.suspects import local_suspect

log = logging.getLogger("moeguard.watermark")

MAX_BODY_BYTES = 1 << 20
MAX_PROMPTS = 64
MAX_TOKENS = 256


class _BadRequest(Exception):
    pass


def _prompts_of(body: dict[str, Any], chat: bool) -> list[str]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty list")
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise _BadRequest("the last user message must have string 'content'")
        return [users[-1]]
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise _BadRequest("'prompt' must be a string or a non-empty list of strings")
    if len(prompts) > MAX_PROMPTS:
        raise _BadRequest(f"at most {MAX_PROMPTS} prompts per request")
    return prompts


def _max_tokens_of(body: dict[str, Any]) -> int:
    value = body.get("max_tokens", 16)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TOKENS:
        raise _BadRequest(f"'max_tokens' must be an integer in 1..{MAX_TOKENS}")
    return value


@contextmanager
def serve_model(model: Any, tokenizer: Any = None, *, host: str = "127.0.0.1", port: int = 0, name: str = "local") -> Iterator[str]:
    """Serve ``model`` (an ``MoEModel`` or a causal LM) in a background thread; yields the base URL.

    ``port=0`` picks a free port. The server stops when the block ends.
    """
    suspect = local_suspect(model, tokenizer, name=name)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
            log.debug("server: " + format, *args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            chat = self.path.rstrip("/") == "/v1/chat/completions"
            if not chat and self.path.rstrip("/") != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY_BYTES:
                    raise _BadRequest(f"the body must be 1..{MAX_BODY_BYTES} bytes of JSON")
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise _BadRequest("the body must be a JSON object")
                prompts, budget = _prompts_of(body, chat), _max_tokens_of(body)
            except (_BadRequest, ValueError) as error:
                self._send(400, {"error": {"message": str(error), "type": "invalid_request_error"}})
                return
            with lock:
                texts = suspect.complete(prompts, [budget] * len(prompts))
            if chat:
                choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "finish_reason": "stop"}]
            else:
                choices = [{"index": i, "text": text, "finish_reason": "stop"} for i, text in enumerate(texts)]
            self._send(200, {"object": "chat.completion" if chat else "text_completion", "model": name, "choices": choices})

    server = ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="moeguard-serve", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
