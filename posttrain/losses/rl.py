"""Online-RL pieces for PPO (rewards, GAE, whitening, the value loss) as pure functions of per-token tensors; the
policy losses, KL estimators and advantage estimators are tables in losses.policy and losses.advantages.

Shapes: a batch of completions is (N, T) with a float ``mask`` that is 1 on completion tokens and 0 on padding;
per-sequence quantities are (N,). Nothing here runs a model.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           moments: tuple[float, float] | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (PPO's advantage whitening); padding stays 0. ``moments``: the
    (mean, variance) to use instead of this tensor's own, e.g. over a rollout split across processes."""
    if moments is None:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    else:
        mean, var = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in moments)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """PPO-RLHF per-token rewards (Ouyang et al. 2022; Ziegler et al. 2019): -kl_coef * (logp - ref_logp) on every
    completion token, plus the reward model's score on the last one."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
    return rewards + last.to(rewards.dtype) * scores[:, None]


def prob_steps(probs: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """A step's reward is the PRM's probability that it is correct. Summed over steps (gamma = 1), more steps
    means more reward: a policy can gain by writing more (correct but idle) steps (Gao et al. 2024, "On Designing
    Effective RL Reward at Training Time for LLM Reasoning"); watch completion_len and prm/steps."""
    return probs * step_mask


def clip_steps(probs: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Gao et al. 2024's Clip mechanism, min(p - eta, 0), with eta = 0.5 (the probability's own decision
    boundary): a step the PRM thinks more likely wrong than right costs, a likely-right one adds nothing, so a
    completion's step rewards are bounded above by 0 and extra steps cannot raise them."""
    return (probs - 0.5).clamp(max=0.0) * step_mask


# How a PRM's step probabilities (N, S) become step rewards; padded steps (mask 0) give 0.
STEP_REWARDS = {"prob": prob_steps, "clip": clip_steps}


def step_shaped_rewards(rewards: torch.Tensor, step_rewards: torch.Tensor, step_tokens: torch.Tensor,
                        step_mask: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """Per-token rewards (N, T) plus process rewards: coef * step_rewards[i, s] on token step_tokens[i, s], the
    completion token that ends step s (Lightman et al. 2023's step-level supervision, given where each step is
    written, as kl_shaped_rewards gives the outcome score on the last token). Padded steps (step_mask 0, any
    token index in range) add nothing; two steps ending on one token both count."""
    add = torch.zeros_like(rewards).scatter_add_(1, step_tokens, (coef * step_rewards * step_mask).to(rewards.dtype))
    return rewards + add


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over each completion, the value after the
    last token being 0: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages, returns = advantages + values), zero on padding."""
    n, t = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    for i in range(t - 1, -1, -1):
        m = mask[:, i]
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        a = delta + gamma * lam * next_adv
        adv[:, i] = a * m
        # Padding after a completion passes nothing back; a real token hands its value and advantage on.
        next_adv = torch.where(m > 0, a, next_adv)
        next_value = torch.where(m > 0, values[:, i], next_value)
    return adv, (adv + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_eps: float = 0.2) -> torch.Tensor:
    """PPO's value loss per token: 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-eps),
    so one update cannot move a value estimate far from the one the advantages were computed with."""
    v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * torch.maximum((values - returns) ** 2, (v_clip - returns) ** 2)


def chained_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, owner: list[int],
                gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over multi-turn trajectories whose tokens are spread over rows. Row i belongs to trajectory
    ``owner[i]`` (its rows in order: one per segment of a split trajectory); ``mask`` marks the tokens the policy
    sampled, the only actions. Each trajectory's sampled tokens, in order across its rows, form one chain:
    environment tokens between turns and the seams between rows pass the next action's value and advantage
    straight back (``gae`` already skips masked positions within a row). So the last token of a turn bootstraps
    from the value at the first token of the next turn, and only the trajectory's last sampled token sees V = 0."""
    flat_r, flat_v = rewards.reshape(-1), values.reshape(-1)
    width = rewards.shape[1]
    chains: dict[int, list[int]] = {}
    for i, k in enumerate(owner):  # flat positions of trajectory k's sampled tokens, in order
        row = torch.nonzero(mask[i] > 0).squeeze(-1) + i * width
        chains.setdefault(k, []).extend(row.tolist())
    order = list(chains.values())
    length = max([1, *map(len, order)])
    pos = torch.zeros(len(order), length, dtype=torch.long)
    cm = torch.zeros(len(order), length, dtype=rewards.dtype)
    for j, flat in enumerate(order):
        pos[j, :len(flat)], cm[j, :len(flat)] = torch.tensor(flat, dtype=torch.long), 1.0
    adv_c, _ = gae(flat_r[pos] * cm, flat_v[pos] * cm, cm, gamma, lam)
    adv = torch.zeros_like(flat_r)
    adv[pos[cm > 0]] = adv_c[cm > 0]
    adv = adv.reshape(rewards.shape) * (mask > 0)
    return adv, (adv + values) * (mask > 0)
