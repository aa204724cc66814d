"""Fixtures the in-process app tests share: a real Redis per module, one tiny model per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.openai_schema import spec_available
from tests.support.responses_cases import NO_SPEC, Official
from zumik_serve.model.tiny import build_tiny_model
from zumik_serve.store.local_redis import LocalRedis


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A real redis-server of the test module's own (its tests share it, other modules don't)."""
    server = LocalRedis(data_dir=tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis_url(module_redis: LocalRedis) -> str:
    """``module_redis``'s URL."""
    return module_redis.url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (its tokenizer and chat template are what /v2 tokenizes with)."""
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


# The two shape authorities of the Responses translation tests (tests/support/responses_cases.py).
@pytest.fixture(params=["sdk", "spec"])
def official(request: pytest.FixtureRequest) -> Official:
    if request.param == "spec" and not spec_available():
        pytest.skip(NO_SPEC)
    return Official(request.param)


@pytest.fixture
def spec() -> None:
    if not spec_available():
        pytest.skip(NO_SPEC)
