"""Jinja prompt templates over an item's fields, with errors that name the item."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from mergesearch.errors import ProbeError


class PromptTemplate:
    def __init__(self, text: str, where: str):
        try:
            self._template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
                text)
        except jinja2.TemplateSyntaxError as e:
            raise ProbeError(f"{where}.template: invalid Jinja template ({e.message})") from None

    def render(self, values: dict[str, Any], file: Path, index: int) -> str:
        try:
            return self._template.render(values)
        except jinja2.UndefinedError as e:
            raise ProbeError(f"{file}: item {index + 1}: the template uses a field the item "
                             f"does not have ({e.message}; its fields: "
                             f"{', '.join(sorted(map(str, values)))})") from None
        except Exception as e:  # a template's own mistake on this item's values
            raise ProbeError(f"{file}: item {index + 1}: the template fails on this item "
                             f"({type(e).__name__}: {e})") from None
