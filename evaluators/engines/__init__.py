"""Inference engines: one interface; the HF engine (CPU or GPU) and the vLLM engine (GPU,
in `vllm_engine`, imported where it is used so that nothing else needs vLLM)."""

from evaluators.engines.base import Engine, GenerationRequest, LoglikelihoodRequest
from evaluators.engines.hf import HFEngine

__all__ = ["Engine", "GenerationRequest", "HFEngine", "LoglikelihoodRequest"]
