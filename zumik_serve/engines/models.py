"""The models a gateway serves: their OpenAI model cards, the engine group each belongs to, and
each group's tokenizer.

A profile serves one model per engine group and the group's LoRA adapters beside it; an
adapter runs on its base model's engines and shares its tokenizer. Tokenizers (and chat
templates) are loaded on first use: only ``/v2`` generation, snapshot compilation and warming
need them, and loading one costs a second.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from zumik_serve.errors import EngineError
from zumik_serve.state.compiler import ChatTokenizer


@dataclass(frozen=True)
class ModelCard:
    id: str
    created_s: int
    owned_by: str = "zumik"
    base: str | None = None  # an adapter's base model (its engine group); None for a model


class ServedModels:
    def __init__(
        self,
        cards: list[ModelCard],
        tokenizer_factory: Callable[[str], ChatTokenizer] | None = None,
    ) -> None:
        """``tokenizer_factory(model)``: the tokenizer of the engine group of base model ``model``."""
        if not cards:
            raise ValueError("a gateway serves at least one model")
        self.cards = cards
        self.ids = frozenset(card.id for card in cards)
        self._tokenizer_factory = tokenizer_factory
        self._tokenizers: dict[str, ChatTokenizer] = {}

    @property
    def default(self) -> str:
        """The model a request that names none runs on (``/v2``)."""
        return self.cards[0].id

    def card(self, model_id: str) -> ModelCard | None:
        return next((card for card in self.cards if card.id == model_id), None)

    def group(self, model_id: str) -> str:
        """The base model whose engine group serves ``model_id`` (itself, or an adapter's base)."""
        card = self.card(model_id)
        return card.base or card.id if card is not None else model_id

    def tokenizer(self, model_id: str | None = None) -> ChatTokenizer:
        """The tokenizer and chat template of ``model_id``'s engine group (default: the first
        model's), loaded on first use."""
        group = self.group(model_id or self.default)
        tokenizer = self._tokenizers.get(group)
        if tokenizer is None:
            if self._tokenizer_factory is None:
                raise EngineError("this gateway has no tokenizer for the served model", status=501)
            tokenizer = self._tokenizers[group] = self._tokenizer_factory(group)
        return tokenizer


def model_cards(groups: Mapping[str, tuple[str, ...]], created_s: int) -> list[ModelCard]:
    """Cards for each group's base model (``groups``: base → its adapters), then its adapters."""
    cards: list[ModelCard] = []
    for base, adapters in groups.items():
        cards.append(ModelCard(id=base, created_s=created_s))
        cards.extend(ModelCard(id=adapter, created_s=created_s, base=base) for adapter in adapters)
    return cards
