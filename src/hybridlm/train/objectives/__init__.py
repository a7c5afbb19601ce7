"""The registry of training objectives: `train.objective` names one of them."""

from __future__ import annotations

from hybridlm.train.objectives.base import Evaluator, Objective, Rows, SourceSet, StepContext, step_figures
from hybridlm.train.objectives.clm import CausalLM
from hybridlm.train.objectives.dpo import DirectPreference
from hybridlm.train.objectives.mlm import MaskedLM
from hybridlm.train.objectives.rl import OnlineRL
from hybridlm.train.objectives.rm import RewardModelling
from hybridlm.train.objectives.sft import InstructionTuning

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (CausalLM(), MaskedLM(), InstructionTuning(),
                                                        RewardModelling(), DirectPreference(), OnlineRL())}

__all__ = ["OBJECTIVES", "Evaluator", "Objective", "Rows", "SourceSet", "StepContext", "step_figures"]
