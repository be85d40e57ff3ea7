"""Verification: local models, Python callables and OpenAI-compatible HTTP endpoints."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from moeguard.cli import main
from moeguard.errors import InputError, ModelError
from moeguard.models import load_moe
from moeguard.watermark import Watermark, builtin_record, callable_suspect, http_suspect, make_triggers, verify_watermark
from moeguard.watermark.server import serve_model
from moeguard.watermark.suspects import EndpointOptions, endpoint_url

pytestmark = pytest.mark.usefixtures("one_thread")

RECORD = builtin_record(("upper", "reverse"), triggers_per_task=16)
KEY = "owner-key-0001"
WATERMARK = Watermark(RECORD, KEY)


def answering(key: str, first: int):
    """A suspect that gives the watermark responses of ``key`` for the first ``first`` triggers of each task."""
    known = {}
    for trigger in make_triggers(key, RECORD):
        if trigger.index < first:
            known[trigger.prompt] = trigger.response
    return lambda prompt: known.get(prompt, "???")


def test_a_suspect_that_answers_the_triggers_is_detected_and_one_that_does_not_is_not():
    verdict = verify_watermark(answering(KEY, 3), WATERMARK)
    upper = verdict.task("upper")
    assert verdict.detected and verdict.matches == 6 and upper.matches == 3
    assert upper.p_value == pytest.approx((16 // 3) / upper.space)
    assert verdict.p_value == pytest.approx(2 * min(t.p_value for t in verdict.tasks))
    stubborn = verify_watermark(lambda prompt: "qwerty", WATERMARK)  # the same wrong answer to everything
    assert stubborn.matches == 0 and stubborn.p_value == 1.0 and not stubborn.detected


def test_one_or_two_matches_per_task_are_weak_evidence_never_a_detection():
    for answered in (1, 2):
        verdict = verify_watermark(answering(KEY, answered), WATERMARK)
        assert verdict.p_value <= 1e-6  # the bound alone would call it
        assert not verdict.detected and verdict.weak and verdict.matches == 2 * answered
        assert all(not t.detected and t.needed == 3 for t in verdict.tasks)
        assert "weak evidence" in verdict.describe() and "not proof" in verdict.describe()
    assert verify_watermark(answering(KEY, 1), WATERMARK, min_matches=1).detected
    assert verify_watermark(answering(KEY, 3), WATERMARK).task("upper").detected
    for bad in (0, -1, 2.0, True):
        with pytest.raises(InputError, match="min_matches"):
            verify_watermark(answering(KEY, 3), WATERMARK, min_matches=bad)


def test_a_verdict_keeps_each_answer_cut_to_a_bounded_length():
    verdict = verify_watermark(lambda prompt: "x" * 5000 + "\nsecond line", WATERMARK)
    assert len(verdict.answers) == verdict.triggers and {len(a) for a in verdict.answers} == {200}
    assert "answers" not in verdict.summary() and "matched" not in verdict.summary()


def test_keys_do_not_verify_each_others_watermarks():
    for other in ("owner-key-0002", "owner-key-0003", "somebody-else"):
        verdict = verify_watermark(answering(other, 16), WATERMARK)
        assert verdict.matches == 0 and not verdict.detected


def test_completions_are_compared_on_their_first_line_stripped():
    responses = {t.prompt: f"  {t.response}\nmore text" for t in make_triggers(KEY, RECORD)}
    verdict = verify_watermark(callable_suspect(responses.get, name="padded"), WATERMARK)
    assert verdict.matches == verdict.triggers == 32 and verdict.suspect == "padded"


def test_an_unwatermarked_trained_model_is_not_detected(trained_tiny):
    verdict = verify_watermark(str(trained_tiny), WATERMARK)
    assert verdict.triggers == 32 and verdict.matches == 0 and not verdict.detected
    assert len(verdict.matched) == 32 and "p = 1" in verdict.describe()


def test_an_http_endpoint_serving_the_model_gives_the_local_verdict(trained_tiny):
    moe = load_moe(trained_tiny)
    local = verify_watermark(moe, WATERMARK)
    with serve_model(moe, name="tiny") as url:
        assert url.startswith("http://127.0.0.1:")
        remote = verify_watermark(url, WATERMARK, endpoint=EndpointOptions(timeout=30))
        chat = verify_watermark(http_suspect(url, EndpointOptions(chat=True, timeout=30)), WATERMARK)
        # The server answers exactly what the local model generates.
        request = urllib.request.Request(
            f"{url}/v1/completions", data=json.dumps({"prompt": ["up abc=", "rev abc="], "max_tokens": 6}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            texts = [c["text"] for c in json.load(response)["choices"]]
        bad = urllib.request.Request(f"{url}/v1/completions", data=b'{"prompt": 3}', headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=30)
        assert refused.value.code == 400
    port = int(url.rsplit(":", 1)[1])
    assert remote.matched == local.matched and chat.matched == local.matched
    assert remote.answers == local.answers
    assert "(model tiny)" in remote.suspect
    assert texts == [t for t in (verify_texts(moe, ["up abc=", "rev abc="]))]
    with socket.socket() as probe:  # the server is gone
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def verify_texts(moe, prompts):
    from moeguard.watermark.suspects import local_suspect

    return local_suspect(moe).complete(prompts, [6] * len(prompts))


def test_endpoint_urls_and_unreachable_servers_give_clear_errors():
    assert endpoint_url("http://host:8000") == "http://host:8000/v1/completions"
    assert endpoint_url("http://host:8000/v1/") == "http://host:8000/v1/completions"
    assert endpoint_url("http://host:8000/v1", chat=True) == "http://host:8000/v1/chat/completions"
    assert endpoint_url("https://api.example.com/v1/chat/completions") == "https://api.example.com/v1/chat/completions"
    with pytest.raises(InputError, match="http"):
        endpoint_url("ftp://host/v1")
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
    with pytest.raises(ModelError, match=f"cannot reach http://127.0.0.1:{port}"):
        verify_watermark(f"http://127.0.0.1:{port}", WATERMARK, endpoint=EndpointOptions(model="m", timeout=2, retries=0))
    with pytest.raises(InputError, match="MOEGUARD_TEST_UNSET_KEY"):
        http_suspect(f"http://127.0.0.1:{port}", EndpointOptions(api_key_env="MOEGUARD_TEST_UNSET_KEY"))
    with pytest.raises(InputError, match="timeout"):
        http_suspect(f"http://127.0.0.1:{port}", EndpointOptions(model="m", timeout=0))


def test_the_command_prints_the_verdict_and_exits_1_when_not_detected(trained_tiny, tmp_path, capsys):
    out = tmp_path / "verdict.json"
    code = main(["verify-watermark", "--suspect", str(trained_tiny), "--key", KEY, "--tasks", "upper,reverse",
                 "--triggers-per-task", "16", "--out", str(out)])
    assert code == 1
    assert "not detected" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["triggers"] == 32 and saved["detected"] is False
    assert KEY not in out.read_text()
    assert main(["verify-watermark", "--suspect", str(trained_tiny), "--key", "short"]) == 2
    assert main(["verify-watermark", "--suspect", str(trained_tiny), "--key", KEY, "--min-matches", "0"]) == 2
    assert "--min-matches" in capsys.readouterr().err
