"""`PromptEncoder`: how requests become token ids, the same for every engine.

Both engines format a `GenerationRequest` through the model's chat template and tokenize
continuations the way lm-eval does; only how the ids are run differs. An engine sets
`tokenizer` and `max_length` (positions a sequence may take) and inherits the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer

from evaluators.engines.base import GenerationRequest, LoglikelihoodRequest
from mergesearch.errors import MergesearchError

log = logging.getLogger(__name__)


def load_tokenizer(model_dir: Path | str):
    """The model folder's tokenizer, padding on the left, with a pad token."""
    if not Path(model_dir).is_dir():
        raise MergesearchError(f"model folder {model_dir} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class PromptEncoder:
    tokenizer: object
    _warned_cut = False

    @property
    def max_length(self) -> int:
        raise NotImplementedError

    def format(self, request: GenerationRequest) -> str:
        """The prompt as the model sees it: through the chat template where it has one."""
        if not self.uses_chat_template(request):
            shots = "".join(f"{q}\n{a}\n\n" for q, a in request.examples)
            system = f"{request.system}\n\n" if request.system else ""
            return system + shots + request.prompt
        messages = [{"role": "system", "content": request.system}] if request.system else []
        for question, answer in request.examples:
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": request.prompt})
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def uses_chat_template(self, request: GenerationRequest) -> bool:
        return request.chat and bool(self.tokenizer.chat_template)

    def encode(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens, cut from the left where prompt and output would not fit in
        the model's positions (lm-eval cuts the same way)."""
        # A chat template writes its own special tokens (BOS included); plain text gets them.
        templated = self.uses_chat_template(request)
        ids = self.tokenizer(self.format(request), add_special_tokens=not templated)["input_ids"]
        room = self.max_length - request.max_new_tokens
        if len(ids) > room:
            if not self._warned_cut:
                self._warned_cut = True
                log.warning("prompt of %d tokens cut to its last %d to leave room for %d new "
                            "tokens in %d positions (warned once)", len(ids), room,
                            request.max_new_tokens, self.max_length)
            ids = ids[-room:] if room > 0 else ids[-1:]
        return ids

    def continuation_tokens(self, request: LoglikelihoodRequest) -> tuple[list[int], int]:
        """Tokens of context + continuation, and how many at the end are the continuation.
        Spaces ending the context move to the continuation (` yes`, not ` ` then `yes`), as
        lm-eval does (newlines stay: a chat template ends its prompt with one), and the
        continuation's tokens are those of the whole text past the context's, so that they
        are the tokens the model would produce."""
        context, continuation = request.context, request.continuation
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        # Text that a chat template wrote starts with its own BOS: do not add a second.
        bos = self.tokenizer.bos_token
        special = not (bos and context.startswith(bos))
        whole = self.tokenizer(context + continuation, add_special_tokens=special)["input_ids"]
        prefix = self.tokenizer(context, add_special_tokens=special)["input_ids"]
        if not prefix:  # the first token needs something to be predicted from
            start = self.tokenizer.bos_token_id
            start = self.tokenizer.eos_token_id if start is None else start
            whole, prefix = [start, *whole], [start]
        tokens = len(whole) - len(prefix)
        if tokens <= 0:
            raise MergesearchError(f"continuation {request.continuation!r} adds no tokens")
        if tokens >= self.max_length:
            raise MergesearchError(f"continuation of {tokens} tokens does not fit in the "
                                   f"model's {self.max_length} positions")
        return whole[-self.max_length :], tokens
