"""Parents for the GPU scripts: Llama-shaped Hugging Face folders with random bf16 weights,
made on the GPU (no download: the GPU machines have no network) and written once.

`tiny` is a smoke-test shape (head size 64, which every vLLM attention backend takes);
`8b` is Llama-3.1-8B's (32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary
128256); `150m` (153M parameters with the 1024-token vocabulary) and its smoke-test stand-in
`15m` are what bench/vllm_cpu.py runs on the CPU, where the folders are made too. Each shape
has a `base` and two fine-tunes of it, `clinical` and `instruct`.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench.merge_speed import random_state, timed  # noqa: E402
from evaluators.engines.vllm_engine import vllm_missing  # noqa: E402
from search.demo import synthetic  # noqa: E402
from search.demo.build import build_tokenizer  # noqa: E402

# hidden, intermediate, layers, heads, kv heads, vocabulary (None: the tokenizer's), std
SHAPES = {"tiny": (256, 512, 2, 4, 2, None, 0.2), "8b": (4096, 14336, 32, 32, 8, 128256, 0.02),
          "150m": (768, 3072, 16, 12, 12, None, 0.02), "15m": (512, 1536, 4, 8, 8, None, 0.02)}


def argument_parser(doc: str, shape: str, prompts: int, max_new_tokens: int
                    ) -> argparse.ArgumentParser:
    """The options both GPU scripts take; each adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default=shape)
    parser.add_argument("--models", type=Path, default=Path("/tmp/mergesearch-gpu-models"))
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs")
    return parser


def parse_on_gpu(parser: argparse.ArgumentParser, script: str) -> argparse.Namespace:
    """The arguments, or an exit that says what this machine lacks for vLLM."""
    args = parser.parse_args()
    missing = vllm_missing() or (() if torch.cuda.is_available() else
                                 ("this machine has no CUDA GPU (bench/vllm_cpu.py measures "
                                  "vLLM's CPU build)",))
    if missing:
        sys.exit(f"{Path(script).name} needs a GPU with vLLM: {'; '.join(missing)}")
    return args


def prompts(n: int, seed: int = 0) -> list[str]:
    """Probe-length prompts: radiology findings and instructions from the demo's generator."""
    rng = random.Random(seed)
    makers = (synthetic.radiology_example, synthetic.instruction_example)
    return [makers[i % 2](rng).prompt for i in range(n)]


def llama_config(shape: str, tokenizer) -> LlamaConfig:
    hidden, intermediate, layers, heads, kv_heads, vocab, _ = SHAPES[shape]
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        vocab_size=vocab or len(tokenizer), max_position_embeddings=4096, rope_theta=500000.0,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, torch_dtype="bfloat16")


def make_parents(root: Path, shape: str, names: tuple[str, ...] = ("base", "clinical", "instruct"),
                 tokenizer=None) -> dict[str, Path]:
    """Folders under root/shape: made once, reused by later runs on the same machine; with
    `tokenizer` (else one trained on probe-length prompts) saved into each."""
    folders = {name: root / shape / name for name in names}
    if all((f / "model.safetensors").is_file() for f in folders.values()):
        return folders
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = tokenizer or build_tokenizer(prompts(400), vocab_size=1024)
    config = llama_config(shape, tokenizer)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    std = SHAPES[shape][-1]
    base = random_state(shapes, device, seed=0, std=std)
    for seed, (name, folder) in enumerate(folders.items()):
        state = base if name == "base" else random_state(shapes, device, seed, base, std)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file({k: v.cpu().contiguous() for k, v in state.items()},
                  partial / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        GenerationConfig(do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        del state
    del base
    torch.cuda.empty_cache() if device == "cuda" else None
    return folders


def generation_speed(engine, requests: list, device: str = "cuda") -> tuple[float, float]:
    """(requests per second, generated tokens per second: the outputs re-tokenized)."""
    outputs: list[str] = []
    seconds = timed(lambda: outputs.extend(engine.generate(requests)), device)
    tokens = sum(len(engine.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
    return len(requests) / seconds, tokens / seconds


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])
