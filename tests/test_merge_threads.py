"""The merged bytes must not depend on torch's CPU thread count: a trial's weights are hashed
where they are scored (vLLM's CPU worker runs with its own thread count) and export re-merges
them to prove that hash. Torch's multi-threaded reductions sum in a thread-count-dependent
order, so every method is merged here at 1, 2 and 4 threads and the hashes must be equal.

Parents are real-sized enough for torch to split reductions across threads (tensors of a
few hundred thousand to a million elements, bf16 like most checkpoints); the old DARE
rescale (`delta.abs().sum()`) gave three different hashes at 1, 2 and 4 threads here."""

from __future__ import annotations

import pytest
import torch

from merging import Materializer, MergeRecipe, Parents
from merging.materializer import WeightsHash
from merging.methods import fixed_sum
from tests.test_methods import ALL, _recipe

THREADS = (1, 2, 4)
SHAPES = {
    "model.embed_tokens.weight": (1664, 640),  # over 1M entries: top-k brackets by a sample
    "model.layers.0.self_attn.q_proj.weight": (512, 512),
    "model.layers.0.input_layernorm.weight": (512,),
    "model.layers.1.mlp.down_proj.bias": (200_000,),  # 1-D and long: one "row" to reduce
    "model.norm.weight": (512,),
    "lm_head.weight": (128, 640),
}
VARIANTS = [(name, {}) for name in ALL] + [
    ("nuslerp", {"nuslerp_flatten": 0.0}),
    ("nuslerp", {"nuslerp_flatten": 0.0, "nuslerp_row_wise": 1.0}),
    ("model_stock", {"filter_wise": 1.0}),
]


@pytest.fixture(scope="module")
def big_parents() -> Parents:
    """A base and two fine-tunes of it, with weight-like values (norms near 1)."""
    gen = torch.Generator().manual_seed(11)

    def like(shape, name, scale):
        return torch.randn(shape, generator=gen) * scale + (1.0 if "norm" in name else 0.0)

    base = {n: like(s, n, 0.02) for n, s in SHAPES.items()}
    tensors = {"base": base}
    for model in ("clinical", "instruct"):
        tensors[model] = {n: t + like(t.shape, "", 0.002) for n, t in base.items()}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "num_hidden_layers": 2}
    return Parents.from_tensors(
        {m: {n: t.to(torch.bfloat16) for n, t in ts.items()} for m, ts in tensors.items()},
        config)


@pytest.fixture
def threads():
    """Set torch's CPU thread count inside the test; the old count comes back afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _hashes(parents: Parents, recipe: MergeRecipe, set_threads) -> dict[int, str]:
    hashes = {}
    for count in THREADS:
        set_threads(count)
        assert torch.get_num_threads() == count
        hashes[count] = Materializer(parents).weights_hash(recipe, torch.float32)
    return hashes


@pytest.mark.parametrize("name,params", VARIANTS,
                         ids=[n + "".join(f"-{k}" for k in p) for n, p in VARIANTS])
def test_merged_bytes_do_not_depend_on_the_thread_count(name, params, big_parents, threads):
    base = _recipe(name, density=0.4)
    recipe = MergeRecipe(method=base.method, models=base.models, base=base.base,
                         model_params=base.model_params, params={**base.params, **params}, seed=3)
    hashes = _hashes(big_parents, recipe, threads)
    assert len(set(hashes.values())) == 1, hashes


def test_bf16_output_does_not_depend_on_the_thread_count(big_parents, threads):
    """Stored in bf16, the merge goes through the same reductions and other bytes."""
    recipe = _recipe("dare_ties", density=0.3)
    hashes = set()
    for count in THREADS:
        threads(count)
        digest = WeightsHash()
        for _ in Materializer(big_parents).tensors(recipe, torch.bfloat16, digest):
            pass
        hashes.add(digest.hexdigest())
    assert len(hashes) == 1


@pytest.mark.parametrize("shape,dim", [((1_000_003,), None), ((3, 200_001), -1),
                                       ((5, 70_001), 0), ((), None), ((0,), None)])
def test_fixed_sum_is_a_sum_in_one_order(shape, dim, threads):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kept = x.clone()
    sums = []
    for count in THREADS:
        threads(count)
        sums.append(fixed_sum(x, dim))
        sums.append(fixed_sum(x.clone(), dim, scratch=True))  # the same sum, in place
    assert torch.equal(x, kept)
    assert all(torch.equal(sums[0], s) for s in sums[1:])
    expected = x.double().sum() if dim is None else x.double().sum(dim)
    torch.testing.assert_close(sums[0].double(), expected, rtol=1e-5, atol=1e-3)
    if dim is not None:
        assert fixed_sum(x, dim, keepdim=True).shape == x.sum(dim, keepdim=True).shape

