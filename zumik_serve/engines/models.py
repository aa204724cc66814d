"""The models a gateway serves: their OpenAI model cards and the tokenizer of the served model.

The tokenizer (and chat template) is loaded on first use: only ``/v2`` generation, snapshot
compilation and warming need it, and loading it costs a second at start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zumik_serve.errors import EngineError
from zumik_serve.state.compiler import ChatTokenizer


@dataclass(frozen=True)
class ModelCard:
    id: str
    created_s: int
    owned_by: str = "zumik"


class ServedModels:
    def __init__(
        self, cards: list[ModelCard], tokenizer_factory: Callable[[], ChatTokenizer] | None = None
    ) -> None:
        if not cards:
            raise ValueError("a gateway serves at least one model")
        self.cards = cards
        self.ids = frozenset(card.id for card in cards)
        self._tokenizer_factory = tokenizer_factory
        self._tokenizer: ChatTokenizer | None = None

    @property
    def default(self) -> str:
        """The model a request that names none runs on (``/v2``)."""
        return self.cards[0].id

    def card(self, model_id: str) -> ModelCard | None:
        return next((card for card in self.cards if card.id == model_id), None)

    def tokenizer(self) -> ChatTokenizer:
        """The served model's tokenizer and chat template (loaded on first use)."""
        if self._tokenizer is None:
            if self._tokenizer_factory is None:
                raise EngineError("this gateway has no tokenizer for the served model", status=501)
            self._tokenizer = self._tokenizer_factory()
        return self._tokenizer
