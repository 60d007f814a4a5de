"""Inference engines: one interface, an HF engine (CPU or GPU) now, vLLM later."""

from evaluators.engines.base import Engine, GenerationRequest, LoglikelihoodRequest
from evaluators.engines.hf import HFEngine

__all__ = ["Engine", "GenerationRequest", "HFEngine", "LoglikelihoodRequest"]
