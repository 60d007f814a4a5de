"""Probes by kind. A probe kind is a config model (its spec fields) and a probe class."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from evaluators.probes.base import Probe, ProbeConfig, ProbeItem
from evaluators.probes.choice import ChoiceProbe, ChoiceProbeConfig
from evaluators.probes.generation import GenerationProbe, GenerationProbeConfig
from evaluators.probes.instruction import InstructionProbe, InstructionProbeConfig
from evaluators.probes.lm_eval_task import LmEvalProbe, LmEvalProbeConfig

PROBE_KINDS: dict[str, tuple[type[ProbeConfig], type[Probe]]] = {
    "generation": (GenerationProbeConfig, GenerationProbe),
    "instruction": (InstructionProbeConfig, InstructionProbe),
    "choice": (ChoiceProbeConfig, ChoiceProbe),
    "lm_eval": (LmEvalProbeConfig, LmEvalProbe),
}

AnyProbeConfig = Annotated[
    GenerationProbeConfig | InstructionProbeConfig | ChoiceProbeConfig | LmEvalProbeConfig,
    Field(discriminator="kind"),
]


def build_probe(config: ProbeConfig, where: str) -> Probe:
    return PROBE_KINDS[config.kind][1](config, where)  # type: ignore[attr-defined]


__all__ = ["PROBE_KINDS", "AnyProbeConfig", "Probe", "ProbeConfig", "ProbeItem", "build_probe"]
