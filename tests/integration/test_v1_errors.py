"""/v1 errors against the real stack: real statuses, OpenAI error objects, nothing echoed.

Every error body is exactly ``{"error": {"message", "type", "param", "code"}}`` with ``code`` a
string or null (the official ``Error`` schema), and it says what to do next.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.openai_schema import assert_matches_spec_component, spec_available

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def _assert_error(
    response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if spec_available():
        assert_matches_spec_component(body, "ErrorResponse")
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def _chat(model: str, **kwargs: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kwargs}


def test_malformed_json_is_400(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    error = _assert_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]


def test_non_object_json_is_400(http: httpx.Client) -> None:
    _assert_error(http.post("/v1/chat/completions", json=[1, 2]), 400)


def test_missing_messages_is_400_with_param(http: httpx.Client, running_stack) -> None:
    _assert_error(
        http.post("/v1/chat/completions", json={"model": running_stack.model}), 400, param="messages"
    )


def test_missing_model_is_400_with_param(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    _assert_error(response, 400, param="model")


def test_invalid_field_value_is_400_with_param(client: openai.OpenAI, running_stack) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**_chat(running_stack.model, temperature=-3))
    assert info.value.body["param"] == "temperature"


def test_wrong_field_type_is_400_with_param(http: httpx.Client, running_stack) -> None:
    response = http.post("/v1/chat/completions", json=_chat(running_stack.model, max_tokens="many"))
    _assert_error(response, 400, param="max_tokens")


def test_unknown_field_is_400_and_vllm_extensions_are_refused(http: httpx.Client, running_stack) -> None:
    error = _assert_error(
        http.post("/v1/chat/completions", json=_chat(running_stack.model, kv_transfer_params={"x": 1})),
        400,
        param="kv_transfer_params",
    )
    assert "Unrecognized" in error["message"]


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(**_chat("gpt-nonexistent"))
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_context_is_400_context_length_exceeded(
    http: httpx.Client, running_stack, stream: bool
) -> None:
    body = {
        "model": running_stack.model,
        "messages": [{"role": "user", "content": "word " * 3000}],
        "max_tokens": 4,
        "stream": stream,
    }
    error = _assert_error(http.post("/v1/chat/completions", json=body), 400, code="context_length_exceeded")
    assert error["param"] == "messages"
    assert "word word word" not in error["message"]  # the input is never echoed back


def test_completion_prompt_over_context_is_400(http: httpx.Client, running_stack) -> None:
    body = {"model": running_stack.model, "prompt": "word " * 3000, "max_tokens": 4}
    _assert_error(
        http.post("/v1/completions", json=body), 400, code="context_length_exceeded", param="prompt"
    )


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic abc", "Bearer"])
@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions"])
def test_missing_or_bad_key_is_401(running_stack, header: str | None, path: str) -> None:
    headers = {"Authorization": header} if header is not None else {}
    with httpx.Client(base_url=running_stack.url, timeout=30) as raw:
        response = (
            raw.post(path, json={}, headers=headers) if "chat" in path else raw.get(path, headers=headers)
        )
    error = _assert_error(response, 401)
    assert error["type"] == "authentication_error"


def test_bad_key_through_sdk_is_authentication_error(running_stack) -> None:
    bad = openai.OpenAI(base_url=f"{running_stack.url}/v1", api_key="zk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_dev_key_is_accepted(running_stack) -> None:
    from tests.integration.conftest import DEV_KEY

    dev = openai.OpenAI(base_url=f"{running_stack.url}/v1", api_key=DEV_KEY, max_retries=0)
    assert [model.id for model in dev.models.list()] == [running_stack.model]


def test_oversized_body_is_413(http: httpx.Client, running_stack) -> None:
    huge = "x" * (running_stack.stack.config.profile.gateway.max_body_bytes + 10)
    response = http.post("/v1/chat/completions", json=_chat(running_stack.model, user=huge))
    error = _assert_error(response, 413)
    assert "limit" in error["message"]


def test_unknown_path_is_404_error_object(http: httpx.Client) -> None:
    _assert_error(http.get("/v1/nope"), 404)


def test_unsupported_spec_field_is_400(http: httpx.Client, running_stack) -> None:
    body = _chat(running_stack.model, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    _assert_error(http.post("/v1/chat/completions", json=body), 400)
