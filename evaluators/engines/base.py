"""The engine interface every probe talks to: greedy generation and log-likelihoods of
continuations, over a model that a recipe can be loaded into in place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from merging.materializer import WeightsHash
from merging.recipe import MergeRecipe


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete greedily. `chat` wraps it in the model's chat template, after
    `system` and the few-shot `examples` (user, assistant) turns; without a chat template the
    examples are written as plain text before the prompt. Generation ends at
    `max_new_tokens`, the end of turn, or the first `stop` string (cut from the output)."""

    prompt: str
    max_new_tokens: int = 128
    system: str | None = None
    chat: bool = True
    stop: tuple[str, ...] = ()
    examples: tuple[tuple[str, str], ...] = ()
    strip: bool = True  # strip the output's surrounding whitespace (lm-eval does not)


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """log P(continuation | context) of raw text (no chat template; a probe that wants one
    formats the context itself)."""

    context: str
    continuation: str


class Engine(Protocol):
    tokenizer: Any

    def load_recipe(self, recipe: MergeRecipe) -> WeightsHash:
        """Make the engine's model the recipe's merge, in place; return the weights' hash,
        which may still be computing while the engine generates (`hexdigest()` waits)."""
        ...

    def generate(self, requests: list[GenerationRequest]) -> list[str]: ...

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding
        would produce exactly it) per request."""
        ...

    def format(self, request: GenerationRequest) -> str:
        """The prompt text as the model sees it."""
        ...

    def close(self) -> None: ...


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the first of the `stop` strings."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]
