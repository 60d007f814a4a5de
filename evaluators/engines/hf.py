"""`HFEngine`: transformers inference, batched greedy generation with left padding.

The model is loaded once from a Hugging Face folder (a parent, or any model to evaluate).
`load_recipe` overwrites its parameters in place with the merge, so a study keeps one model
in memory however many candidates it scores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators.engines.base import GenerationRequest
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


class HFEngine:
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
        if not Path(model_dir).is_dir():
            raise MergesearchError(f"model folder {model_dir} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
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

    def format(self, request: GenerationRequest) -> str:
        """The prompt as the model sees it: through the chat template where it has one."""
        if not self.uses_chat_template(request):
            return request.prompt
        messages = [{"role": "user", "content": request.prompt}]
        if request.system:
            messages.insert(0, {"role": "system", "content": request.system})
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def uses_chat_template(self, request: GenerationRequest) -> bool:
        return request.chat and bool(self.tokenizer.chat_template)

    def encode(self, request: GenerationRequest) -> list[int]:
        # A chat template writes its own special tokens (BOS included); plain text gets them.
        templated = self.uses_chat_template(request)
        return self.tokenizer(self.format(request), add_special_tokens=not templated)["input_ids"]

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        encoded = [self.encode(r) for r in requests]
        # Batch prompts of similar length with the same budget together: less padding.
        order = sorted(range(len(requests)), key=lambda i: (requests[i].max_new_tokens,
                                                             len(encoded[i])))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            budget = max(requests[i].max_new_tokens for i in batch)
            enc = self.tokenizer.pad(
                {"input_ids": [encoded[i] for i in batch]}, return_tensors="pt"
            ).to(self.device)
            generated = self.model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=budget,
                pad_token_id=self.tokenizer.pad_token_id,
                # The model's generation config may list several stop tokens (end of turn and
                # end of text); only fall back to the tokenizer's when it names none.
                eos_token_id=self.model.generation_config.eos_token_id
                or self.tokenizer.eos_token_id,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            for i, tokens in zip(batch, new_tokens, strict=True):
                tokens = tokens[: requests[i].max_new_tokens]
                outputs[i] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return outputs  # type: ignore[return-value]

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
