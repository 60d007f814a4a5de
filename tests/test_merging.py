import pytest
import torch
from transformers import AutoModelForCausalLM

from mergesearch.errors import MergesearchError, ParentError
from merging import Materializer, MergeRecipe, Parents
from merging.layout import tensor_gene
from merging.materializer import WeightsHash
from merging.methods.linear import linear
from merging.recipe import resolve_gene_value
from tests.conftest import make_model


def mix(t: float | dict) -> MergeRecipe:
    other = {g: 1 - v for g, v in t.items()} if isinstance(t, dict) else 1 - t
    return MergeRecipe("linear", ("clinical", "instruct"),
                       {"clinical": {"weight": other}, "instruct": {"weight": t}})


def test_gene_values_fall_back_up_the_hierarchy():
    value = {"layers.1": 0.2, "layers.1.attn": 0.9, "*": 0.5}
    assert resolve_gene_value(value, "layers.1.attn") == 0.9
    assert resolve_gene_value(value, "layers.1.mlp") == 0.2
    assert resolve_gene_value(value, "embed") == 0.5
    assert resolve_gene_value(0.3, "anything") == 0.3
    assert resolve_gene_value({"layers.0": 1.0}, "norm") is None
    assert resolve_gene_value({"layers.0": 1.0, "model.norm.weight": 0.7}, "norm",
                              "model.norm.weight") == 0.7


def test_recipe_json_round_trip():
    recipe = mix({"layers.0": 0.25, "*": 0.75})
    assert MergeRecipe.from_json(recipe.to_json()) == recipe


@pytest.mark.parametrize("name,gene", [
    ("model.layers.3.self_attn.q_proj.weight", "layers.3.attn"),
    ("model.layers.3.mlp.down_proj.weight", "layers.3.mlp"),
    ("model.layers.3.input_layernorm.weight", "layers.3"),
    ("model.language_model.layers.1.self_attn.o_proj.weight", "layers.1.attn"),
    ("transformer.h.2.attn.c_attn.weight", "layers.2.attn"),
    ("transformer.h.2.mlp.c_fc.weight", "layers.2.mlp"),
    ("transformer.wte.weight", "embed"),
    ("model.embed_tokens.weight", "embed"),
    ("model.norm.weight", "norm"),
    ("transformer.ln_f.weight", "norm"),
    ("lm_head.weight", "lm_head"),
])
def test_genes_come_from_names_not_a_table(name, gene):
    assert tensor_gene(name, num_layers=4) == gene


def test_linear_matches_its_formula():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(linear([a, b], None, [0.3, 0.7]), 0.3 * a + 0.7 * b)
    torch.testing.assert_close(linear([a, b], None, [1.0, 3.0]), (a + 3 * b) / 4)
    torch.testing.assert_close(linear([a, b], None, [1.0, 3.0], normalize=0.0), a + 3 * b)


def test_a_parent_alone_reproduces_its_weights_exactly(parents):
    materializer = Materializer(Parents({k: parents[k] for k in ("clinical", "instruct")}))
    for name, tensor in materializer.tensors(mix(0.0), torch.float32):
        assert torch.equal(tensor, materializer.parents.tensor("clinical", name))


def test_per_layer_weights_reach_their_layers(parents):
    p = Parents({k: parents[k] for k in ("clinical", "instruct")})
    recipe = mix({"layers.1": 1.0, "*": 0.0})
    merged = dict(Materializer(p).tensors(recipe, torch.float32))
    for name, tensor in merged.items():
        source = "instruct" if ".layers.1." in name else "clinical"
        assert torch.equal(tensor, p.tensor(source, name)), name


def test_write_into_is_in_place_and_hashes_like_export(parents):
    materializer = Materializer(Parents({k: parents[k] for k in ("clinical", "instruct")}))
    model = AutoModelForCausalLM.from_pretrained(parents["instruct"])
    pointers = {n: t.data_ptr() for n, t in model.state_dict().items()}
    recipe = mix({"layers.0": 0.3, "layers.2": 0.8, "*": 0.5})
    written = materializer.write_into(model, recipe).hexdigest()
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == pointers
    assert written == materializer.weights_hash(recipe, torch.float32)
    assert written != materializer.weights_hash(mix(0.5), torch.float32)
    expected = dict(materializer.tensors(recipe, torch.float32))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_hash_covers_dtype_and_bytes():
    a, b = WeightsHash(), WeightsHash()
    a.update("x", torch.ones(2))
    b.update("x", torch.ones(2, dtype=torch.bfloat16))
    assert a.hexdigest() != b.hexdigest()


def test_recipe_naming_an_unknown_parent_is_refused(parents):
    materializer = Materializer(Parents({k: parents[k] for k in ("clinical", "instruct")}))
    bad = MergeRecipe("linear", ("clinical", "medical"), {})
    with pytest.raises(MergesearchError, match="medical"):
        materializer.check(bad)
    with pytest.raises(MergesearchError, match="unknown merge method"):
        materializer.check(MergeRecipe("nope", ("clinical",), {}))


def test_parents_with_other_shapes_name_the_tensor(tmp_path, tokenizer, parents):
    make_model(tmp_path / "wide", tokenizer, seed=3, intermediate_size=96)
    with pytest.raises(ParentError, match=r"mlp\.(down|gate|up)_proj\.weight.*shape"):
        Parents({"clinical": parents["clinical"], "wide": tmp_path / "wide"})


def test_parents_with_other_architectures_are_refused(tmp_path, parents):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(parents["instruct"], other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "mistral"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ParentError, match="model_type"):
        Parents({"clinical": parents["clinical"], "other": other})


def test_parent_without_safetensors_is_refused(tmp_path, parents):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(parents["instruct"], folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ParentError, match="safetensors"):
        Parents({"clinical": parents["clinical"], "pickled": folder})


def test_tied_embeddings_merge_once_and_stay_tied(tmp_path, tokenizer):
    base = make_model(tmp_path / "base", tokenizer, seed=5, tie_word_embeddings=True)
    make_model(tmp_path / "a", tokenizer, seed=6, base=base, tie_word_embeddings=True)
    make_model(tmp_path / "b", tokenizer, seed=7, base=base, tie_word_embeddings=True)
    parents = Parents({"clinical": tmp_path / "a", "instruct": tmp_path / "b"})
    assert "lm_head.weight" not in parents.names
    assert parents.layout.outer_genes() == ["embed", "norm"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    Materializer(parents).write_into(model, mix(0.0))
    embed = parents.tensor("clinical", "model.embed_tokens.weight")
    assert torch.equal(model.lm_head.weight, embed)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
