"""BERTScore (Zhang et al. 2020) with a local encoder: F1 of greedy cosine matching between
the contextual embeddings of an output's tokens and the reference's (no idf weighting, no
baseline rescaling), computed on the CPU so it never competes with the engine's GPU."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from mergesearch.errors import ProbeError


class BertScorer:
    def __init__(self, folder: Path, where: str, batch_size: int = 32):
        if not Path(folder).is_dir():
            raise ProbeError(f"{where}: scoring model folder {folder} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> list[torch.Tensor]:
        """Unit-length embeddings of each text's tokens, special tokens left out."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], padding=True,
                                 truncation=True, return_tensors="pt",
                                 return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask")
            hidden = self.model(**enc).last_hidden_state
            keep = enc["attention_mask"].bool() & ~special.bool()
            out += [torch.nn.functional.normalize(h[k], dim=-1)
                    for h, k in zip(hidden, keep, strict=True)]
        return out

    def f1(self, outputs: list[str], references: list[str]) -> list[float]:
        scores = []
        for cand, ref in zip(self._embed(outputs), self._embed(references), strict=True):
            if not len(cand) or not len(ref):
                scores.append(0.0)
                continue
            sim = cand @ ref.T
            precision, recall = sim.max(dim=1).values.mean(), sim.max(dim=0).values.mean()
            scores.append((2 * precision * recall / (precision + recall)).item())
        return scores
