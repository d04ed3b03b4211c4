"""The ``posttrain distill`` job: on-policy distillation (GKD) of a teacher into the student on prompts.

The student's samples come from posttrain's own sampler on the training model (the ``hf`` rollout engine), the
teacher's from the same sampler on the teacher.

Layer 1 (config): imports only pydantic, the stdlib and the other ``config`` modules.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.jobs import JobBase, check_share_prompt
from posttrain.config.sections import PromptDataConfig, Section, TrainConfig


class TeacherSpec(Section):
    name: str | None = Field(None, description="the teacher's model (a path or 'embedded'); null: model.name, the "
                             "student's own base")
    adapter: str | None = Field(None, description="a LoRA adapter folder or a posttrain run folder on that model. "
                                "With finetune: lora and the teacher's model the student's, the teacher is the "
                                "student's own base with this adapter switched on (no second copy of the weights)")


class DistillSection(Section):
    teacher: TeacherSpec = TeacherSpec()
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "jsd", description="per token: forward_kl KL(teacher || student), reverse_kl KL(student || teacher), jsd "
        "the generalized JSD with beta (losses.distill)")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: the teacher's weight in the mixture; 0 is "
                        "forward_kl, 1 is reverse_kl (TRL's GKD convention)")
    temperature: float = Field(1.0, gt=0, description="both models' logits are divided by it in the divergence")
    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="the share of rollouts that are the student's own samples "
                         "(on-policy, TRL's GKDConfig.lmbda); the rest are off-policy sequences")
    off_policy: Literal["dataset", "teacher"] = Field(
        "dataset", description="the off-policy sequences: the rows' own answers (a messages row's last assistant "
        "turn, a chosen conversation's, or a completion column), or the teacher's samples")
    prompts_per_step: int = Field(8, gt=0, description="prompts (one sequence each) per optimizer step")
    max_new_tokens: int = Field(128, gt=0, description="the longest sample; dataset answers beyond it are cut to "
                                "it (counted in the data report)")
    sample_temperature: float = Field(1.0, gt=0, description="sampling temperature of the student's (and, with "
                                      "off_policy: teacher, the teacher's) samples")
    top_p: float = Field(1.0, gt=0, le=1.0, description="nucleus sampling of those samples")
    eval_max_new_tokens: int = Field(128, gt=0, description="the teacher's greedy answers to the held-out prompts "
                                     "(made once, cached in the run folder), scored at every eval")


class DistillConfig(JobBase):
    method: Literal["distill"] = "distill"
    output_dir: str = "runs/distill"
    data: PromptDataConfig
    train: TrainConfig = TrainConfig(lr=1e-4, micro_batch_size=4)
    distill: DistillSection = DistillSection()

    _share = model_validator(mode="after")(check_share_prompt)

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        t = self.distill.teacher
        if (t.name is None or t.name == self.model.name) and not t.adapter and not self.model.init_adapter:
            raise ValueError("distill.teacher is the student's own starting point (the same model, no adapter): "
                             "there is nothing to distill; set distill.teacher.name or distill.teacher.adapter")
        if "beta" in self.distill.model_fields_set and self.distill.divergence != "jsd":
            raise ValueError(f"distill.beta applies to divergence: jsd only; {self.distill.divergence} has none")
        return self
