"""`HFEngine`: transformers inference: batched greedy generation (sorted by length, left
padding, stop strings) and batched log-likelihoods of continuations.

The model is loaded once from a Hugging Face folder (a parent, or any model to evaluate).
`load_recipe` overwrites its parameters in place with the merge, so a study keeps one model
in memory however many candidates it scores.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from evaluators.engines.base import GenerationRequest, LoglikelihoodRequest, cut_at_stop
from evaluators.engines.prompts import PromptEncoder, load_tokenizer
from mergesearch.devices import resolve_device
from mergesearch.errors import MergesearchError
from merging.materializer import Materializer, WeightsHash
from merging.recipe import MergeRecipe

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is float32 on CPU (bf16 matmuls are slow there) and bfloat16 on GPU."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return DTYPES[dtype]


class StopStrings(StoppingCriteria):
    """Stop a sequence once its generated text (never the prompt) holds a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length
        # Only the last few tokens can complete a stop string: decode a window, not it all.
        self.window = max(len(tokenizer(s, add_special_tokens=False)["input_ids"])
                          for s in stop) + 2

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_length :][:, -self.window :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts],
                            device=input_ids.device)


class HFEngine(PromptEncoder):
    def __init__(
        self,
        model_dir: Path | str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        materializer: Materializer | None = None,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.materializer = materializer
        self._weights_hash: WeightsHash | None = None
        self.tokenizer = load_tokenizer(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        self.model.to(self.device).eval()
        log.info("loaded %s on %s as %s", model_dir, self.device, self.dtype)

    def load_recipe(self, recipe: MergeRecipe) -> WeightsHash:
        if self.materializer is None:
            raise MergesearchError("this engine was started without parents to merge")
        if self._weights_hash is not None:
            self._weights_hash.hexdigest()  # the last hash must finish reading the weights
        self._weights_hash = self.materializer.write_into(self.model, recipe)
        return self._weights_hash

    @property
    def max_length(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 2**31

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        encoded = [self.encode(r) for r in requests]
        # Batch prompts of similar length with the same budget and stops together.
        key = [(r.max_new_tokens, r.stop) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (key[i], len(encoded[i])))
        start = 0
        while start < len(order):
            first = key[order[start]]
            batch = list(itertools.takewhile(lambda i, first=first: key[i] == first,
                                             order[start : start + self.batch_size]))
            start += len(batch)
            budget, stop = first
            enc = self.tokenizer.pad(
                {"input_ids": [encoded[i] for i in batch]}, return_tensors="pt"
            ).to(self.device)
            prompt_length = enc["input_ids"].shape[1]
            criteria = StoppingCriteriaList(
                [StopStrings(self.tokenizer, stop, prompt_length)] if stop else [])
            generated = self.model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=budget,
                pad_token_id=self.tokenizer.pad_token_id,
                # The model's generation config may list several stop tokens (end of turn and
                # end of text); only fall back to the tokenizer's when it names none.
                eos_token_id=self.model.generation_config.eos_token_id
                or self.tokenizer.eos_token_id,
                stopping_criteria=criteria,
            )
            for i, tokens in zip(batch, generated[:, prompt_length:], strict=True):
                text = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), stop)
                outputs[i] = text.strip() if requests[i].strip else text
        return outputs  # type: ignore[return-value]

    @torch.no_grad()
    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        encoded = [self.continuation_tokens(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i][0]))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(encoded[batch[0]][0])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: positions start at 0 everywhere
                tokens = encoded[i][0]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(batch):
                tokens, count = encoded[i]
                end = len(tokens)
                # logits at position p predict token p + 1
                scores = logits[row, end - count - 1 : end - 1].float().log_softmax(dim=-1)
                target = torch.tensor(tokens[end - count :], device=scores.device)
                logprob = scores.gather(1, target[:, None]).sum().item()
                results[i] = (logprob, bool((scores.argmax(dim=-1) == target).all()))
        return results  # type: ignore[return-value]

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
