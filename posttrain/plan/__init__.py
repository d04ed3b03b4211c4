"""Before training: parameter counts, memory budgets, prompt-vs-fine-tune cost and a method advisor.

Pure Python (no torch), so it answers for a 70B model on any machine.

Layer 6: imports errors only (its command line is posttrain/cli/plan.py).
"""

from posttrain.plan.advise import Decision, advise, choose_approach, choose_method
from posttrain.plan.arch import PRESETS, Arch, arch_from_config, load_arch
from posttrain.plan.cost import CostPlan, plan_cost
from posttrain.plan.memory import GPU_SIZES_GB, MemoryPlan, activation_bytes, nf4_bytes, plan_memory
from posttrain.plan.params import LINEAR_MODULES, ParamCount, Trainable, count_params, trainable_params

__all__ = ["GPU_SIZES_GB", "LINEAR_MODULES", "PRESETS", "Arch", "CostPlan", "Decision", "MemoryPlan", "ParamCount",
           "Trainable", "activation_bytes", "advise", "arch_from_config", "choose_approach",
           "choose_method", "count_params", "load_arch", "nf4_bytes", "plan_cost", "plan_memory", "trainable_params"]
