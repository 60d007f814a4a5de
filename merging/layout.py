"""`ModelLayout`: which gene each parameter of a checkpoint belongs to.

Layers are found by the first all-digit component of a parameter name (`model.layers.3.`,
`transformer.h.3.`, `model.language_model.layers.3.`), checked against the config's layer
count, so Llama, Mistral, Qwen2, Gemma and GPT-2 style names all work without a table.
Outside the layers there are three genes of their own: `embed`, `norm` and `lm_head`.
Inside a layer, attention and MLP tensors get sub-genes `layers.N.attn` and `layers.N.mlp`;
a recipe that only gives `layers.N` covers both.
"""

from __future__ import annotations

from dataclasses import dataclass

_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn", "experts")
_EMBED_WORDS = ("embed", "wte", "wpe")
_HEAD_WORDS = ("lm_head",)

VOCAB_GENES = ("embed", "lm_head")  # genes whose tensors have one row per token


def _layer_index(parts: list[str]) -> int | None:
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return i
    return None


def tensor_gene(name: str, num_layers: int) -> str:
    """The most specific gene of parameter `name` in a model with `num_layers` layers."""
    parts = name.split(".")
    at = _layer_index(parts)
    if at is not None and int(parts[at]) < num_layers:
        gene = f"layers.{int(parts[at])}"
        inner = parts[at + 1 :]
        if any(word in part for part in inner for word in _ATTENTION_WORDS):
            return f"{gene}.attn"
        if any(word in part for part in inner for word in _MLP_WORDS):
            return f"{gene}.mlp"
        return gene
    if any(word in part for part in parts for word in _HEAD_WORDS):
        return "lm_head"
    if any(word in part for part in parts for word in _EMBED_WORDS):
        return "embed"
    return "norm"


@dataclass(frozen=True)
class ModelLayout:
    """Gene of every tensor, plus the ordered gene lists a search space draws from."""

    num_layers: int
    genes_by_tensor: dict[str, str]

    @classmethod
    def from_names(cls, names: list[str], num_layers: int) -> ModelLayout:
        return cls(num_layers, {name: tensor_gene(name, num_layers) for name in names})

    def gene(self, tensor_name: str) -> str:
        return self.genes_by_tensor[tensor_name]

    def layer_genes(self) -> list[str]:
        return [f"layers.{i}" for i in range(self.num_layers)]

    def outer_genes(self) -> list[str]:
        """`embed`, `norm`, `lm_head`, in that order, for those the checkpoint has."""
        present = set(self.genes_by_tensor.values())
        return [g for g in ("embed", "norm", "lm_head") if g in present]
