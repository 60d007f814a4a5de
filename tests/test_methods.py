"""Every registered merge method on tiny tensors and tiny models: what each must do exactly
(reproduce a parent, interpolate, keep the density asked for), determinism of random masks,
and the materializer's placements and vocabulary handling."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from merging import METHODS, Materializer, MergeRecipe, Parents
from merging.methods import get_method
from merging.methods import sparsify as sp
from tests.conftest import make_model

ALL = ["linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_linear", "dare_ties",
       "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock"]


def test_registry_has_every_method_with_a_formula_docstring():
    assert set(ALL) <= set(METHODS)
    for name in ALL:
        doc = getattr(get_method(name).merge, "func", get_method(name).merge).__doc__
        assert doc and "=" in doc.splitlines()[0], name


def _tensors(n=2, shape=(16, 12), seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=gen)
    return base, [base + 0.3 * torch.randn(*shape, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_linear", "dare_ties",
                                  "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"])
def test_task_vector_methods_give_a_parent_alone_back_at_full_density(name):
    base, (x, y) = _tensors()
    method = get_method(name)
    args = {"weight": [1.0, 0.0], "density": [1.0, 1.0], "lambda": 1.0, "normalize": 1.0,
            "rescale": 1.0, "gamma": [0.01, 0.01], "epsilon": [0.1, 0.1]}
    args = {k: v for k, v in args.items() if k in {p.name for p in method.params}}
    merged = method.merge([x, y], base, generator=torch.Generator().manual_seed(0), **args)
    torch.testing.assert_close(merged, x)


def test_task_arithmetic_is_base_plus_scaled_sum_of_task_vectors():
    base, (x, y) = _tensors()
    merged = get_method("task_arithmetic").merge(
        [x, y], base, weight=[0.5, 2.0], density=[1.0, 1.0], normalize=0.0, rescale=0.0,
        **{"lambda": 0.8})
    torch.testing.assert_close(merged, base + 0.8 * (0.5 * (x - base) + 2.0 * (y - base)))


def test_ties_keeps_the_largest_entries_and_the_majority_sign():
    delta = torch.tensor([0.1, -3.0, 2.0, 0.05])
    assert sp.magnitude(delta, 0.5).tolist() == [0.0, -3.0, 2.0, 0.0]
    base = torch.zeros(3)
    merged = get_method("ties").merge(
        [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([3.0, 2.0, -1.0])], base,
        weight=[1.0, 1.0], density=[1.0, 1.0], normalize=1.0, rescale=0.0, **{"lambda": 1.0})
    # entry 1: signs disagree, the sum (+1) wins, so only the +2 counts; entry 2 likewise.
    assert merged.tolist() == [2.0, 2.0, 2.0]


def test_dare_keeps_about_density_and_rescales_two_ways():
    delta = torch.randn(200, 200, generator=torch.Generator().manual_seed(1))
    kept = sp.random(delta, 0.3, torch.Generator().manual_seed(2))
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(kept.abs().sum(), delta.abs().sum())  # mergekit: same L1
    paper = sp.random(delta, 0.3, torch.Generator().manual_seed(2), by_probability=True)
    torch.testing.assert_close(paper[kept != 0], delta[kept != 0] / 0.3)  # paper: 1/p


def test_breadcrumbs_drops_the_top_outliers_and_the_smallest():
    delta = torch.arange(1.0, 101.0)
    kept = sp.magnitude_outliers(delta, density=0.5, gamma=0.1)
    assert torch.nonzero(kept).flatten().tolist() == list(range(40, 90))


def test_slerp_ends_are_the_parents_and_keeps_the_norm_between_orthogonal_ones():
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    slerp = get_method("slerp").merge
    torch.testing.assert_close(slerp([y], x, t=0.0), x)
    torch.testing.assert_close(slerp([y], x, t=1.0), y)
    assert torch.linalg.vector_norm(slerp([y], x, t=0.3)).item() == pytest.approx(1.0)


def test_nuslerp_t_is_the_relative_weight_and_model_stock_pulls_towards_the_base():
    base, (x, y) = _tensors()
    nuslerp = get_method("nuslerp").merge
    torch.testing.assert_close(nuslerp([x, y], None, weight=[1.0, 0.0]), x)
    torch.testing.assert_close(nuslerp([x, y], base, weight=[0.0, 3.0]), y)
    merged = get_method("model_stock").merge([x, y], base)
    between = ((merged - base).norm() / ((x + y) / 2 - base).norm()).item()
    assert 0.0 < between < 1.0  # independent noise: cos ~ 0, so t is small


def _linear(a, b, weight_b=0.3, **extra):
    return MergeRecipe(method="linear", models=(a, b),
                       model_params={a: {"weight": 1 - weight_b}, b: {"weight": weight_b}},
                       **extra)


def test_mmap_placement_gives_the_same_bytes_as_memory(parents):
    paths = {k: parents[k] for k in ("clinical", "instruct")}
    recipe = _linear("clinical", "instruct")
    in_memory = Materializer(Parents(paths)).weights_hash(recipe, torch.float32)
    assert Materializer(Parents(paths, "mmap")).weights_hash(recipe, torch.float32) == in_memory
    with pytest.raises(Exception, match="unknown placement"):
        Parents(paths, "floppy")


def test_random_masks_are_reproducible_and_depend_on_the_seed(parents):
    materializer = Materializer(Parents(dict(parents)))

    def recipe(seed):
        return MergeRecipe(method="dare_ties", models=("clinical", "instruct"), base="base",
                           model_params={m: {"weight": 0.5, "density": 0.4}
                                         for m in ("clinical", "instruct")}, seed=seed)
    first = materializer.weights_hash(recipe(7), torch.float32)
    assert materializer.weights_hash(recipe(7), torch.float32) == first
    assert materializer.weights_hash(recipe(8), torch.float32) != first


def test_parents_with_different_vocabulary_sizes_merge_common_rows(tmp_path, tokenizer, parents):
    """An instruct model with extra tokens: shared rows are merged, the rest come from the
    model named as the vocabulary's source."""
    base = LlamaForCausalLM.from_pretrained(parents["clinical"])
    bigger = make_model(tmp_path / "bigger", tokenizer, seed=3, vocab_size=len(tokenizer) + 8)
    materializer = Materializer(Parents({"clinical": parents["clinical"],
                                         "bigger": tmp_path / "bigger"}))
    rows = len(tokenizer)
    for source, expected_rows in (("bigger", rows + 8), ("clinical", rows)):
        merged = dict(materializer.tensors(
            _linear("clinical", "bigger", vocab_source=source), torch.float32))
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            ours, theirs = base.state_dict()[name], bigger.state_dict()[name]
            assert merged[name].shape[0] == expected_rows
            torch.testing.assert_close(merged[name][:rows], 0.7 * ours + 0.3 * theirs[:rows])
            if source == "bigger":
                torch.testing.assert_close(merged[name][rows:], theirs[rows:])
    slerped = dict(materializer.tensors(
        MergeRecipe(method="slerp", models=("bigger",), base="clinical", params={"t": 0.4},
                    vocab_source="bigger"), torch.float32))
    name = "model.embed_tokens.weight"
    ours, theirs = base.state_dict()[name], bigger.state_dict()[name]
    expected = get_method("slerp").merge([theirs[:rows]], ours, t=0.4)
    torch.testing.assert_close(slerped[name], torch.cat([expected, theirs[rows:]]))


def _recipe(name: str, density: float = 0.5) -> MergeRecipe:
    """A valid recipe of method `name` over the tiny parents."""
    method = get_method(name)
    if name == "slerp":
        return MergeRecipe(method=name, models=("instruct",), base="clinical",
                           params={"t": 0.3})
    per_model = {"weight": 0.6, "density": density, "gamma": 0.05, "epsilon": 0.1}
    return MergeRecipe(
        method=name, models=("clinical", "instruct"),
        base=None if method.base == "ignored" else "base",
        model_params={m: {k: v for k, v in per_model.items()
                          if k in {p.name for p in method.model_params}}
                      for m in ("clinical", "instruct")})


@pytest.mark.parametrize("name", ALL)
def test_merging_never_changes_the_parents(name, parents):
    """Float32 parents are the very tensors a kernel converts 'to float32': an in-place step
    there would corrupt every later trial."""
    held = Parents(dict(parents))
    before = {m: {k: t.clone() for k, t in ts.items()} for m, ts in held.tensors.items()}
    materializer = Materializer(held)
    first = materializer.weights_hash(_recipe(name), torch.float32)
    model = LlamaForCausalLM.from_pretrained(parents["clinical"])
    assert materializer.write_into(model, _recipe(name)).hexdigest() == first
    for m, tensors in held.tensors.items():
        for k, t in tensors.items():
            assert torch.equal(t, before[m][k]), (m, k)


def test_a_recipe_with_a_bad_value_fails_before_anything_is_written(parents):
    materializer = Materializer(Parents(dict(parents)))
    model = LlamaForCausalLM.from_pretrained(parents["clinical"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = MergeRecipe(method="ties", models=("clinical", "instruct"), base="base",
                         model_params={"clinical": {"weight": 1.0, "density": 0.5},
                                       "instruct": {"weight": 1.0,
                                                    "density": {"layers.2": 1.5, "*": 0.5}}})
    with pytest.raises(Exception, match=r"layers.2.*model 'instruct'.*density = 1.5"):
        materializer.write_into(model, recipe)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


@pytest.mark.parametrize("name,model_params,params,needle", [
    ("linear", {"clinical": {"weight": 1.0}, "instruct": {"weight": -1.0}}, {},
     r"lm_head.weight.*sum to zero"),
    ("della", {"clinical": {"weight": 1.0, "density": 0.9, "epsilon": 0.2},
               "instruct": {"weight": 1.0, "density": 0.5}}, {},
     r"epsilon = 0.2 with density = 0.9"),
    ("ties", {"clinical": {"weight": float("nan"), "density": 0.5},
              "instruct": {"weight": 1.0, "density": 0.5}}, {}, r"weight must be a finite"),
    ("task_arithmetic", {"clinical": {"weight": 1.0}, "instruct": {"weight": 1.0}},
     {"lambda": float("inf")}, r"lambda must be a finite"),
])
def test_values_that_only_fail_together_are_caught_before_merging(
        parents, name, model_params, params, needle):
    materializer = Materializer(Parents(dict(parents)))
    base = None if name == "linear" else "base"
    recipe = MergeRecipe(method=name, models=("clinical", "instruct"), base=base,
                         model_params=model_params, params=params)
    with pytest.raises(Exception, match=needle):
        materializer.plan(recipe)


def test_dare_at_density_zero_keeps_nothing_either_way():
    delta = torch.randn(50, 50)
    for by_probability in (False, True):
        kept = sp.random(delta, 0.0, torch.Generator().manual_seed(0),
                         by_probability=by_probability)
        assert torch.equal(kept, torch.zeros_like(delta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_single_pass_kernel_agrees_with_float32_arithmetic(dtype):
    gen = torch.Generator().manual_seed(3)
    x, y = (torch.randn(300, 70, generator=gen).to(dtype) for _ in range(2))
    method = get_method("linear")
    out = torch.empty_like(x)
    assert method.into([x, y], None, out, weight=[0.3, 0.9])
    reference = method.merge([x.float(), y.float()], None, weight=[0.3, 0.9]).to(dtype)
    step = 2**-7 if dtype == torch.bfloat16 else 1e-6  # one bf16 rounding step, relative
    torch.testing.assert_close(out.float(), reference.float(), rtol=step, atol=step)
    assert not method.into([x, y, y], None, out, weight=[1.0, 1.0, 1.0])  # three: chunked


@pytest.mark.parametrize("k", [1, 1000, 600_000, 1_999_999])
def test_top_k_mask_matches_a_full_sort_on_large_tensors(k):
    values = torch.randn(2_000_000, generator=torch.Generator().manual_seed(4)).abs()
    values[:1000] *= 50  # a heavy tail, so the sampled bracket is not trivially right
    expected = torch.zeros_like(values, dtype=torch.bool)
    expected[torch.argsort(values, descending=True)[:k]] = True
    assert torch.equal(sp.top_k_mask(values, k), expected)


@pytest.mark.parametrize("name", ALL)
def test_scalar_tensors_merge_like_any_other(name):
    """0-d parameters (a learned scale, say) go through the same path (at density 1, so
    that sparsifiers keep everything and both tensors must agree)."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "num_hidden_layers": 1}
    values = {"base": 1.0, "clinical": 2.0, "instruct": 4.0}
    held = Parents.from_tensors({m: {"model.layers.0.scale": torch.tensor(v),
                                     "model.layers.0.mlp.w": torch.full((3,), v)}
                                 for m, v in values.items()}, config)
    merged = dict(Materializer(held).tensors(_recipe(name, density=1.0), torch.float32))
    assert merged["model.layers.0.scale"].shape == ()
    torch.testing.assert_close(merged["model.layers.0.scale"], merged["model.layers.0.mlp.w"][0])
