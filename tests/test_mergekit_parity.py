"""Parity with mergekit itself: the same config gives the same tensors (within 1e-5 relative),
and the config that export writes for a recipe makes mergekit produce that recipe's weights.

Runs where mergekit is installed (it is in the `dev` extra, so `make test` has it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merging import Materializer, MergeRecipe, Parents
from merging.mergekit_config import to_mergekit_config
from merging.methods import get_method
from search.merge_config import merge_config

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorEntry, TensorGroup  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

LAYER_GRADIENT = [{"filter": "self_attn", "value": [0.1, 0.9, 0.4]},
                  {"filter": "mlp", "value": [0.8, 0.2]},
                  {"value": 0.6}]

CONFIGS = {
    "linear": {"models": [{"model": "clinical", "parameters": {"weight": LAYER_GRADIENT}},
                          {"model": "instruct", "parameters": {"weight": [0.3, 0.7, 0.5]}},
                          {"model": "base", "parameters": {"weight": 0.2}}]},
    "linear_pair": {"merge_method": "linear",  # two models: the single-pass lerp kernel
                    "models": [{"model": "clinical", "parameters": {"weight": [0.2, 0.9]}},
                               {"model": "instruct", "parameters": {"weight": 0.6}}]},
    "slerp": {"models": [{"model": "base"}, {"model": "instruct"}], "base_model": "base",
              "parameters": {"t": LAYER_GRADIENT}},
    "nuslerp": {"models": [{"model": "clinical", "parameters": {"weight": [1.0, 0.2]}},
                           {"model": "instruct", "parameters": {"weight": 0.5}}],
                "base_model": "base"},
    "task_arithmetic": {"models": [{"model": "clinical", "parameters": {"weight": 0.7}},
                                   {"model": "instruct", "parameters": {"weight": [0.2, 1.0]}}],
                        "base_model": "base", "parameters": {"lambda": 0.9}},
    "ties": {"models": [{"model": "clinical", "parameters": {"weight": 1.0, "density": 0.5}},
                        {"model": "instruct", "parameters": {
                            "weight": LAYER_GRADIENT, "density": [0.3, 0.9]}}],
             "base_model": "base", "parameters": {"normalize": True}},
    "breadcrumbs": {"models": [{"model": "clinical", "parameters": {"weight": 0.5}},
                               {"model": "instruct", "parameters": {"weight": 0.5}}],
                    "base_model": "base", "parameters": {"density": 0.8, "gamma": 0.05}},
    "breadcrumbs_ties": {"models": [{"model": "clinical", "parameters": {"weight": 0.6}},
                                    {"model": "instruct", "parameters": {"weight": 0.4}}],
                         "base_model": "base",
                         "parameters": {"density": [0.6, 0.9], "gamma": 0.02}},
    "model_stock": {"models": [{"model": "clinical"}, {"model": "instruct"}],
                    "base_model": "base"},
}


def _mergekit_tensors(config: dict, out: Path) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions())
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, reference in theirs.items():
        scale = reference.float().abs().max().clamp(min=1e-12)
        error = (ours[name].float() - reference.float()).abs().max() / scale
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


def _with_paths(config: dict, parents: dict[str, Path]) -> dict:
    config = yaml.safe_load(yaml.safe_dump(config))
    for entry in config["models"]:
        entry["model"] = str(parents[entry["model"]])
    if "base_model" in config:
        config["base_model"] = str(parents[config["base_model"]])
    return config


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merge_command_matches_mergekit(method, parents, tmp_path):
    config = _with_paths({"merge_method": method, **CONFIGS[method], "dtype": "float32"},
                         parents)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    merge_config(path, tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    _assert_same(ours, _mergekit_tensors(config, tmp_path / "theirs"))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_match_mergekit_given_the_same_masks(method):
    """Both draw their masks model by model from one seeded generator: ours explicitly, and
    mergekit from torch's global one, seeded just before."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(24, 16, generator=gen)
    tensors = [base + 0.1 * torch.randn(24, 16, generator=gen) for _ in range(2)]
    weight, density, epsilon = [0.7, 0.4], [0.5, 0.3], [0.1, 0.2]
    theirs_method = registry.get(method)
    params = {"weight": {1: weight[0], 2: weight[1]}, "density": {1: density[0], 2: density[1]},
              "epsilon": {1: epsilon[0], 2: epsilon[1]}, "lambda": 1.3, "int8_mask": False,
              "normalize": theirs_method.default_normalize,
              "rescale": theirs_method.default_rescale}
    group = TensorGroup((TensorEntry(0, base, is_base=True), TensorEntry(1, tensors[0]),
                         TensorEntry(2, tensors[1])))
    torch.manual_seed(1234)
    theirs = theirs_method.merge_group(group, **params)
    ours_method = get_method(method)
    args = {"weight": weight, "density": density, "lambda": 1.3,
            "normalize": float(theirs_method.default_normalize),
            "rescale": float(theirs_method.default_rescale)}
    if method.startswith("della"):
        args["epsilon"] = epsilon
    ours = ours_method.merge(tensors, base, generator=torch.Generator().manual_seed(1234), **args)
    _assert_same({"t": ours}, {"t": theirs})


def test_exported_config_makes_mergekit_produce_the_recipe(parents, tmp_path):
    """A recipe with its own value per layer, per module kind and for embed, norm and lm_head:
    the mergekit config export writes for it merges to the same tensors in mergekit."""
    layers = {f"layers.{i}.{kind}": 0.1 + 0.2 * i + (0.05 if kind == "mlp" else 0.0)
              for i in range(3) for kind in ("attn", "mlp")}
    recipe = MergeRecipe(
        method="ties", models=("clinical", "instruct"), base="base",
        model_params={"clinical": {"weight": {**layers, "*": 0.5, "embed": 0.9,
                                              "lm_head": 0.3, "norm": 0.7},
                                   "density": {"layers.1": 0.4, "*": 0.8}},
                      "instruct": {"weight": 0.6, "density": 0.5}},
        params={"lambda": {"layers.2": 1.2, "*": 1.0}}, vocab_source="instruct")
    paths = {k: parents[k] for k in ("base", "clinical", "instruct")}
    materializer = Materializer(Parents(paths))
    config = to_mergekit_config(recipe, paths, materializer.parents.layout, torch.float32)
    assert config is not None
    ours = dict(materializer.tensors(recipe, torch.float32))
    _assert_same(ours, _mergekit_tensors(config, tmp_path / "theirs"))


ARCHITECTURES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"tie_word_embeddings": True, "head_dim": 16}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_other_architectures_match_mergekit(arch, tmp_path):
    """Layers are found from names and the config alone: Mistral, Qwen2 (attention biases),
    Gemma (tied embeddings) and tied Llama checkpoints merge as mergekit merges them."""
    import transformers

    config_name, model_name, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, **extra)
    torch.manual_seed(0)
    base = getattr(transformers, model_name)(config)
    folders = {}
    for i, name in enumerate(("base", "a", "b")):
        model = getattr(transformers, model_name)(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * i * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    ours_layout = Parents(folders).layout
    assert ours_layout.num_layers == 3 and "layers.2.attn" in ours_layout.genes_by_tensor.values()
    config = _with_paths({**CONFIGS["ties"], "merge_method": "ties", "dtype": "float32"},
                         {"base": folders["base"], "clinical": folders["a"],
                          "instruct": folders["b"]})
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    merge_config(path, tmp_path / "ours")
    _assert_same(load_file(tmp_path / "ours" / "model.safetensors"),
                 _mergekit_tensors(config, tmp_path / "theirs"))
