"""Reading and writing mergekit configs, without mergekit: how settings resolve per tensor,
which keys carry over, and what export writes (its parity with mergekit itself is in
test_mergekit_parity.py)."""

from __future__ import annotations

import pytest
import torch

from merging import MergeRecipe, Parents
from merging.mergekit_config import evaluate_setting, parse_mergekit_config, to_mergekit_config


def test_gradients_interpolate_across_layers_and_filters_pick_by_substring():
    assert evaluate_setting([0.0, 1.0], "x", 0.25, "w") == pytest.approx(0.25)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75, "w") == pytest.approx(0.5)
    setting = [{"filter": "self_attn", "value": [0.2, 0.4]}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 1.0, "w") == 0.4
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 1.0, "w") == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1.0}], "lm_head.weight", 0, "w") is None


def _parse(config: dict, parents: Parents):
    return parse_mergekit_config(config, "test", parents.folders["base"].parent,
                                 lambda _: parents.layout)


def test_tokenizer_source_base_names_the_base_even_for_methods_without_one(parents):
    held = Parents(dict(parents))
    parsed = _parse({"merge_method": "linear", "base_model": "base", "tokenizer_source": "base",
                     "models": [{"model": "clinical", "parameters": {"weight": 1.0}}],
                     "parameters": {"weight": 0.5}, "dtype": "float32",
                     "out_dtype": "bfloat16"}, held)
    assert parsed.recipe.vocab_source == "base" and "base" in parsed.recipe.models
    assert parsed.dtype == torch.bfloat16  # out_dtype is what is stored; dtype is compute


def test_export_computes_in_float32_and_names_a_tokenizer_only_when_vocabularies_differ(
        parents):
    held = Parents(dict(parents))
    recipe = MergeRecipe(method="ties", models=("clinical", "instruct"), base="base",
                         model_params={m: {"weight": 0.5, "density": 0.5}
                                       for m in ("clinical", "instruct")},
                         vocab_source="instruct")
    config = to_mergekit_config(recipe, held.folders, held.layout, torch.bfloat16)
    assert config["dtype"] == "float32" and config["out_dtype"] == "bfloat16"
    assert "tokenizer_source" not in config
    config = to_mergekit_config(recipe, held.folders, held.layout, torch.bfloat16,
                                vocab_differs=True)
    assert config["tokenizer_source"] == str(held.folders["instruct"])
    assert _parse(config, held).recipe.vocab_source == "instruct"


def test_export_gives_no_config_for_what_mergekit_cannot_express(parents):
    held = Parents(dict(parents))
    own = MergeRecipe(method="dare_ties", models=("clinical", "instruct"), base="base",
                      model_params={m: {"weight": 0.5, "density": 0.5}
                                    for m in ("clinical", "instruct")},
                      params={"rescale_by_probability": 1.0})
    assert to_mergekit_config(own, held.folders, held.layout, torch.float32) is None
