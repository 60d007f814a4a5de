"""Build the demo's tokenizer, base model and two fine-tunes, offline, from a seed.

    python -m search.demo.build [--out search/demo/assets]

Steps: train a byte-level BPE tokenizer on the synthetic corpus; pretrain a tiny Llama
("base") on domain sentences without either task; fine-tune one copy on radiology
findings -> impression ("clinical") and another on IFEval-style instructions ("instruct");
write the probe sets (dev and test items never seen in training). Takes a few minutes on
two CPU cores; the results ship in the repository so that the demo does not train.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from search.demo import synthetic

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(corpus: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a chat template, trained on `corpus`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>", padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path,
               dtype: torch.dtype = torch.float32) -> None:
    """Save weights (safetensors, in `dtype`), config, tokenizer and a greedy generation config.
    The model itself is left as it was."""
    if folder.exists():
        shutil.rmtree(folder)
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    copy.deepcopy(model).to(dtype).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def chat_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, prefix: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of prefix+target+<|end|>, and labels that score only the target part."""
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    tail = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return head + tail, [-100] * len(head) + tail


def train(
    model: LlamaForCausalLM,
    batches: Callable[[random.Random], list[tuple[list[int], list[int]]]],
    steps: int,
    lr: float,
    seed: int,
    pad_id: int,
) -> None:
    """AdamW with linear warm-up and cosine decay, on batches drawn from `batches`."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))
        )
        for group in opt.param_groups:
            group["lr"] = lr * scale
        pairs = batches(rng)
        width = max(len(ids) for ids, _ in pairs)
        ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in pairs])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in pairs])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in pairs])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.3f", step + 1, steps, loss.item())
    model.eval()


def _probe_items(make: Callable[[random.Random], dict], seed: int, n: int, seen: set[str],
                 key: str) -> list[dict]:
    rng = random.Random(seed)
    items: list[dict] = []
    while len(items) < n:
        item = make(rng)
        if item[key] not in seen:
            seen.add(item[key])
            items.append(item)
    return items


def write_probes(folder: Path, seed: int, per_split: int, train_texts: set[str]) -> None:
    """Radiology and instruction probe files with `per_split` dev and test items each."""
    folder.mkdir(parents=True, exist_ok=True)
    seen = set(train_texts)
    radiology = _probe_items(synthetic.radiology_item, seed, 2 * per_split, seen, "findings")
    with (folder / "radiology.jsonl").open("w") as f:
        for i, item in enumerate(radiology):
            split = "dev" if i < per_split else "test"
            f.write(json.dumps({"id": f"rad-{i:03d}", **item, "split": split}) + "\n")
    instructions = _probe_items(synthetic.instruction_item, seed + 1, 2 * per_split, seen, "prompt")
    with (folder / "instructions.jsonl").open("w") as f:
        for i, item in enumerate(instructions):
            split = "dev" if i < per_split else "test"
            doc = {k: item[k] for k in ("prompt", "instruction_id_list", "kwargs")}
            f.write(json.dumps({"key": 1000 + i, **doc, "split": split}) + "\n")


def build(out: Path, seed: int = 0, base_steps: int = 1500, tune_steps: int = 350,
          tune_lr: float = 2e-4, instruction_share: float = 0.05, batch_size: int = 16,
          hidden_size: int = 256) -> None:
    rng = random.Random(seed)
    radiology = [synthetic.radiology_example(rng) for _ in range(4000)]
    instructions = [synthetic.instruction_example(rng) for _ in range(4000)]
    general = [synthetic.general_example(rng) for _ in range(4000)]
    corpus = [e.prompt + " " + e.response for e in general + radiology + instructions]
    tokenizer = build_tokenizer(corpus)
    pad = tokenizer.pad_token_id

    def chat_batches(examples: list[synthetic.Example], share: float = 0.0):
        """Batches from `examples`, with a share drawn from the instruction examples: a base
        model has seen some instruction data, but no radiology impressions."""
        def draw(r: random.Random):
            chosen = [r.choice(instructions if r.random() < share else examples)
                      for _ in range(batch_size)]
            return [_encode(tokenizer, chat_prompt(tokenizer, e.prompt), e.response)
                    for e in chosen]
        return draw

    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=hidden_size,
                                              intermediate_size=3 * hidden_size))
    log.info("pretraining base (%d parameters)", sum(p.numel() for p in base.parameters()))
    train(base, chat_batches(general, instruction_share), base_steps, 1e-3, seed, pad)
    # Training is float32 throughout; checkpoints ship in bfloat16, as Llama's do.
    save_model(base, tokenizer, out / "models" / "base", torch.bfloat16)
    for name, examples, steps in (("clinical", radiology, tune_steps),
                                  ("instruct", instructions, 3 * tune_steps)):
        model = copy.deepcopy(base)
        log.info("fine-tuning %s", name)
        train(model, chat_batches(examples), steps, tune_lr, seed + 1, pad)
        save_model(model, tokenizer, out / "models" / name, torch.bfloat16)
    train_texts = {e.prompt for e in instructions} | {
        e.prompt.split("Findings: ", 1)[1] for e in radiology
    }
    write_probes(out / "probes", seed + 100, 40, train_texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--tune-steps", type=int, default=350)
    parser.add_argument("--tune-lr", type=float, default=2e-4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--instruction-share", type=float, default=0.05,
                        help="share of instruction examples in the base model's pretraining")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    build(args.out, args.seed, args.base_steps, args.tune_steps, args.tune_lr,
          args.instruction_share, hidden_size=args.hidden_size)


if __name__ == "__main__":
    main()
