"""The original wrapper's surface beside the gateway's own: `POST /v1/compatibility` and the
landing page at `/` (scripted backend: nothing here runs a model)."""

from typing import Any

import httpx

from tests.conftest import Gateway, assert_documented, assert_schema, chat


def _report(gateway: Gateway, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = httpx.post(f"{gateway.url}/v1/compatibility", json=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    assert_documented(gateway, "post", "/v1/compatibility", report)
    return report


def test_each_parameter_is_reported_with_what_the_gateway_does(scripted: Gateway) -> None:
    body = chat("Hello", temperature=0.8, presence_penalty=0.1, frequency_penalty=0, n=2, user="u", extra=1)
    body |= {"reasoning_effort": "low", "verbosity": "low"}
    report = _report(scripted, body | {"logit_bias": {"1": 2}})
    handling = {p["name"]: p["handling"] for p in report["parameters"]}
    # Those it does not know too (found by an outside probe: left out of the report).
    assert handling == {
        "model": "supported",
        "messages": "supported",
        "temperature": "ignored",
        "n": "supported",
        "presence_penalty": "refused",
        "frequency_penalty": "ignored",
        "logit_bias": "refused",
        "user": "ignored",
        "reasoning_effort": "supported",
        "extra": "ignored",
        "verbosity": "ignored",
    }
    # The verdict is what POST /v1/chat/completions answers: its first refusal.
    assert report["accepted"] is False
    assert report["error"]["code"] == "unsupported_parameter"
    assert report["error"]["param"] == "logit_bias"
    refused = httpx.post(
        f"{scripted.url}/v1/chat/completions", json=body | {"logit_bias": {"1": 2}}, timeout=10
    )
    assert refused.status_code == 400
    assert refused.json()["error"] == report["error"]
    original = report["compatibility_report"]
    assert set(original["unsupported_parameters"]) == {
        "temperature",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "extra",
        "verbosity",
    }
    assert "logit_bias: 400 unsupported_parameter: the gateway cannot honour it" in original["warnings"]


def test_an_acceptable_request_and_the_model_it_would_run(scripted: Gateway) -> None:
    report = _report(
        scripted, chat("Hi", max_tokens=10, session_id="s") | {"model": "claude-sonnet-4-5-20250929"}
    )
    assert report["accepted"] is True
    assert report["error"] is None
    assert report["model"] == "claude-sonnet-4-5"
    assert {p["name"]: p["handling"] for p in report["parameters"]}["session_id"] == "extension"
    unserved = _report(scripted, chat("Hi") | {"model": "claude-3-5-sonnet-20241022"})
    assert unserved["model"] is None
    assert unserved["error"]["code"] == "model_not_found"


def test_the_tool_policy_is_part_of_the_verdict(scripted: Gateway) -> None:
    report = _report(scripted, chat("Hi"), **{"X-Claude-Allowed-Tools": "ls,pwd"})
    assert report["accepted"] is False
    assert report["error"]["code"] == "tool_not_permitted"


def test_a_body_that_is_no_chat_request_is_a_400(scripted: Gateway) -> None:
    response = httpx.post(f"{scripted.url}/v1/compatibility", json={"model": "x"}, timeout=10)
    assert response.status_code == 400
    assert_schema(response.json(), "ErrorResponse")


def test_the_landing_page_links_the_reference_models_and_dashboard(start_gateway: Any) -> None:
    keyed: Gateway = start_gateway(workers=1, BACKEND="scripted", API_KEY="landing-page-test-key")
    page = httpx.get(f"{keyed.url}/", timeout=10)  # no key: the page shows no data
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for link in ('href="docs"', 'href="openapi.json"', 'href="dashboard"'):
        assert link in page.text
    assert "<title>Claude Code Gateway</title>" in page.text
    # What it links to opens in a browser, which sends no key; the models it names need one.
    assert httpx.get(f"{keyed.url}/docs", timeout=10).status_code == 200
    assert "<code>/v1/models</code>" in page.text
    assert httpx.get(f"{keyed.url}/v1/models", timeout=10).status_code == 401


def test_what_changes_a_replys_kind_is_refused_not_dropped(scripted: Gateway) -> None:
    """Audio output, predicted outputs and web search were dropped unseen (a 200 of plain text)."""
    refused = {
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
        "prediction": {"type": "content", "content": "x"},
        "web_search_options": {},
    }
    for name, value in refused.items():
        body = chat("Hello") | {name: value}
        answer = httpx.post(f"{scripted.url}/v1/chat/completions", json=body, timeout=10)
        assert (answer.status_code, answer.json()["error"]["param"]) == (400, name), answer.text
        assert answer.json()["error"] == _report(scripted, body)["error"]
    text_only = httpx.post(f"{scripted.url}/v1/chat/completions", json=chat("Hi") | {"modalities": ["text"]})
    assert text_only.status_code == 200
    url = f"{scripted.url}/v1/chat/completions"
    for name, value in (("tool_choice", "sometimes"), ("function_call", "always")):
        answer = httpx.post(url, json=chat("Hi") | {name: value}, timeout=10)
        assert (answer.status_code, answer.json()["error"]["param"]) == (400, name), answer.text
