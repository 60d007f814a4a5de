"""IFEval's instruction checkers, as lm-eval ships them, usable offline.

lm-eval's checkers split sentences and words with nltk's `punkt_tab` model and try to
download it on import. Where that model is not installed (no network here), a fallback
`punkt_tab/english` is put on nltk's search path first: the same Punkt algorithm with a
hand-written list of English abbreviations and no learned collocations. An installed
`punkt_tab` always wins; the fallback only fills the gap, so no download is attempted.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

FALLBACK_NLTK_DATA = Path(__file__).parent / "nltk_fallback"


@functools.cache
def ensure_sentence_tokenizer() -> str:
    """Make `punkt_tab/english` findable; return 'installed' or 'fallback'."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return "installed"
    except LookupError:
        nltk.data.path.append(str(FALLBACK_NLTK_DATA))
        nltk.data.find("tokenizers/punkt_tab/english/")
        return "fallback"


def _ifeval():
    ensure_sentence_tokenizer()
    import langdetect

    # The language checks call langdetect, which is random unless seeded.
    langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import instructions_registry, utils

    return instructions_registry, utils


def known_instruction_ids() -> set[str]:
    registry, _ = _ifeval()
    return set(registry.INSTRUCTION_DICT)


def instruction_description(instruction_id: str, kwargs: dict[str, Any]) -> str:
    """The instruction's text as IFEval phrases it, for the given arguments."""
    registry, _ = _ifeval()
    instruction = registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    state = random.getstate()  # checkers draw missing arguments from the global generator
    try:
        return instruction.build_description(**kwargs)
    finally:
        random.setstate(state)


def instruction_arguments(instruction_id: str) -> list[str]:
    """The arguments IFEval's checker for `instruction_id` takes."""
    registry, _ = _ifeval()
    return list(registry.INSTRUCTION_DICT[instruction_id](instruction_id)
                .get_instruction_args_keys())


def instruction_results(doc: dict[str, Any], response: str) -> dict[str, Any]:
    """lm-eval's own IFEval scoring of one response: prompt- and instruction-level, strict
    and loose (`prompt_level_strict_acc`, `inst_level_strict_acc`, ...)."""
    _, utils = _ifeval()
    return utils.process_results({"key": doc.get("key", 0), **doc}, [response])
