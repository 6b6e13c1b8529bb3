"""Worked solutions of chapter 06's exercises (and one wrong answer each, to prove the checkers fail)."""

import torch


def kl_rewards(scores, logp, ref_logp, mask, beta):
    mask = mask.float()
    rewards = -beta * (logp - ref_logp) * mask               # the KL leash on every completion token
    last = mask.sum(1).long() - 1                            # each row's last real token
    rewards[torch.arange(len(scores)), last] += scores       # the RM score arrives at the end
    return rewards


def gae(rewards, values, mask, gae_lambda):
    mask = mask.float()
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    next_adv, next_value = torch.zeros(B), torch.zeros(B)
    for t in reversed(range(T)):                             # gamma = 1; padding resets the recursion to 0
        delta = rewards[:, t] + next_value - values[:, t]
        adv[:, t] = (delta + gae_lambda * next_adv) * mask[:, t]
        next_adv, next_value = adv[:, t], values[:, t] * mask[:, t]
    return adv


def value_loss(new_values, old_values, returns, clip):
    clipped = old_values + torch.clamp(new_values - old_values, -clip, clip)
    return 0.5 * torch.max((new_values - returns) ** 2, (clipped - returns) ** 2).mean()


def rloo(rewards, k):
    groups = rewards.view(-1, k)
    baselines = (groups.sum(1, keepdim=True) - groups) / (k - 1)   # the mean of the k - 1 OTHER replies
    return (groups - baselines).flatten()


def _score_on_last_column(scores, logp, ref_logp, mask, beta):
    rewards = -beta * (logp - ref_logp) * mask.float()
    rewards[:, -1] += scores
    return rewards


def ppo_step(policy, batch, epsilon, clip_value, vf_coef):
    # the chapter's pieces: one forward of prompt + completion gives logits and values; the log-probs of the
    # completion tokens and V of the state before each of them; chapter 03's two clipped losses on real tokens
    from apt_course.lm import batch_inputs, completion_token_logprobs
    from apt_course.ppo import ppo_policy_loss, ppo_value_loss

    logits, values = policy(**batch_inputs(batch))
    logp, mask = completion_token_logprobs(logits, batch)
    P = batch["prompt_ids"].size(1)
    values = values[:, P - 1:-1]                             # V(x, y_<t): the position before token t
    m = mask.bool()
    pg = ppo_policy_loss(logp[m], batch["old_logp"][m], batch["advantages"][m], epsilon)
    vl = ppo_value_loss(values[m], batch["old_values"][m], batch["returns"][m], clip_value)
    return pg + vf_coef * vl


def _ppo_parts(policy, batch):
    from apt_course.lm import batch_inputs, completion_token_logprobs

    logits, values = policy(**batch_inputs(batch))
    logp, mask = completion_token_logprobs(logits, batch)
    return logp, values, mask.bool(), batch["prompt_ids"].size(1)


def _ppo_step_no_value_loss(policy, batch, epsilon, clip_value, vf_coef):
    from apt_course.ppo import ppo_policy_loss

    logp, _, m, _ = _ppo_parts(policy, batch)
    return ppo_policy_loss(logp[m], batch["old_logp"][m], batch["advantages"][m], epsilon)


def _ppo_step_unshifted_values(policy, batch, epsilon, clip_value, vf_coef):
    from apt_course.ppo import ppo_policy_loss

    logp, values, m, P = _ppo_parts(policy, batch)
    pg = ppo_policy_loss(logp[m], batch["old_logp"][m], batch["advantages"][m], epsilon)
    return pg + vf_coef * value_loss(values[:, P:][m], batch["old_values"][m], batch["returns"][m], clip_value)


def _ppo_step_with_padding(policy, batch, epsilon, clip_value, vf_coef):
    from apt_course.ppo import ppo_policy_loss

    logp, values, _, P = _ppo_parts(policy, batch)
    pg = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], epsilon)
    return pg + vf_coef * value_loss(values[:, P - 1:-1], batch["old_values"], batch["returns"], clip_value)


def _ppo_step_unclipped(policy, batch, epsilon, clip_value, vf_coef):
    logp, values, m, P = _ppo_parts(policy, batch)
    ratio = torch.exp(logp - batch["old_logp"])
    pg = -(ratio * batch["advantages"])[m].mean()
    return pg + vf_coef * value_loss(values[:, P - 1:-1][m], batch["old_values"][m], batch["returns"][m], clip_value)


SOLUTIONS = {
    "ch06.kl_rewards": lambda: kl_rewards,
    "ch06.token_gae": lambda: gae,
    "ch06.value_loss": lambda: value_loss,
    "ch06.rloo_advantages": lambda: rloo,
    "ch06.ppo_step": lambda: ppo_step,
    "ch06.predict_beta0": lambda: "b",  # KL up, ground truth down
}
WRONG = {
    "ch06.kl_rewards": lambda: _score_on_last_column,
    "ch06.token_gae": lambda: (lambda rewards, values, mask, gae_lambda: (rewards - values) * mask),
    "ch06.value_loss": lambda: (lambda new, old, ret, clip: 0.5 * ((new - ret) ** 2).mean()),
    "ch06.rloo_advantages": lambda: (lambda r, k: r - r.view(-1, k).mean(1).repeat_interleave(k)),
    "ch06.ppo_step": lambda: _ppo_step_no_value_loss,
    "ch06.predict_beta0": lambda: "a",
}
ALSO_WRONG = {
    "ch06.ppo_step": [(_ppo_step_no_value_loss, "value loss is missing"), (_ppo_step_unshifted_values, "one position"),
                      (_ppo_step_with_padding, "padding"), (_ppo_step_unclipped, "not clipped")],
}
