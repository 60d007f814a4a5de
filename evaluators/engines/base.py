"""The engine interface every probe talks to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from merging.materializer import WeightsHash
from merging.recipe import MergeRecipe


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete greedily. `chat` wraps it in the model's chat template."""

    prompt: str
    max_new_tokens: int = 128
    system: str | None = None
    chat: bool = True


class Engine(Protocol):
    tokenizer: Any

    def load_recipe(self, recipe: MergeRecipe) -> WeightsHash:
        """Make the engine's model the recipe's merge, in place; return the weights' hash,
        which may still be computing while the engine generates (`hexdigest()` waits)."""
        ...

    def generate(self, requests: list[GenerationRequest]) -> list[str]: ...

    def close(self) -> None: ...
