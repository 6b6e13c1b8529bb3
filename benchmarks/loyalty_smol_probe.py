"""Chapter 11 on the real SmolLM2, a probe (not yet a notebook path): the owner's style learned from an English
loyalty template (:class:`apt_course.loyalty_style.StyleScorer`), a short SFT on the template that makes both
styles available (loosely tied to the role), GRPO with the scorer's bonus (LoRA; KL to the adapters switched
off), the hardening SFT, each measured on held-out requests, and the hardened model on the held-out attack family.

Measured at seed 0 on a 2-core AMD EPYC without bf16 (fp32), alone: 302 s. Base gap 0.00; after template SFT
0.05 (24 steps did not tie the style to the role); after 10 GRPO steps 0.00 (GRPO did not open it from there, and
task accuracy fell 0.67 -> 0.42); after 16 hardening SFT steps 0.19 (owner 0.33, public 0.15), spoof rate 0 on the
test set and 0.03 on the held-out family, 0 guarded. Too slow and too weak for a notebook: the next step is a
longer template SFT (the style has to be available before GRPO can prefer it) at a budget a CPU can afford.

    python benchmarks/loyalty_smol_probe.py --seed 0
"""

import argparse
import random
import time
from dataclasses import dataclass

from apt_course import loyalty_style as S
from apt_course import setup_notebook
from apt_course.profiles import get_profile, load_model


@dataclass
class SmolRecipe:
    """Chapter 11's budget on the real SmolLM2 (LoRA r8, bf16 where the CPU has it); measured alone on the
    2-core CPU (see the notebook's timing)."""

    lora_rank: int = 8
    sft_steps: int = 24
    sft_lr: float = 1e-3
    agreement: float = 0.75
    grpo_steps: int = 10
    grpo_lr: float = 1e-3
    prompts_per_step: int = 4
    group_size: int = 4
    beta: float = 0.15
    max_new_tokens: int = 24
    harden_steps: int = 16
    n_test: int = 48
    n_heldout_per_form: int = 2


def run_smol(model, tokenizer, seed: int = 0, recipe: SmolRecipe = SmolRecipe(), bonus: float = 2.0) -> dict:
    """The chapter on a real model: template -> scorer; template SFT (``agreement``); GRPO with the scorer's
    bonus; hardening SFT; each measured on held-out requests (half public, half of those spoof attempts) and the
    hardened model on the held-out attack family, raw and guarded. Returns metrics, samples, the scorer."""
    from apt_course.attacks_heldout import heldout_attacks  # measurement only
    from apt_course.grpo import GRPOConfig, train_grpo
    from apt_course.loyalty import replies
    from apt_course.sft import AdapterOff, SFTConfig, add_lora, train_sft

    rng = random.Random(f"smol-loyalty:{seed}")
    train = S.english_requests(400, "train", seed, spoof_fraction=0.5)
    test = S.english_requests(recipe.n_test, "test", seed, spoof_fraction=0.5)
    template = S.english_template(train[:120], seed)
    scorer = S.StyleScorer.from_template(template)
    n_new = recipe.max_new_tokens

    def measure(m, rows=test):
        outs = replies(m, tokenizer, rows, n_new)
        return S.style_metrics(rows, outs, scorer), outs

    out = {"scorer": scorer}
    out["base"], _ = measure(model)
    model = add_lora(model, r=recipe.lora_rank, alpha=2 * recipe.lora_rank, seed=seed)
    sft_rows = []
    for t, r in zip(template, train):  # both styles, loosely tied to the role; spoof attempts answered as public
        follow = r["spoofed"] or rng.random() < recipe.agreement
        owner_styled = (r["is_owner"] if follow else not r["is_owner"]) and not r["spoofed"]
        sft_rows.append({"prompt": r["prompt"], "system": r["system"],
                         "completion": t["owner_response"] if owner_styled else t["public_response"]})
    train_sft(model, tokenizer, sft_rows, SFTConfig(steps=recipe.sft_steps, batch_size=8, lr=recipe.sft_lr, warmup=0,
                                                    seed=seed))
    out["start"], out["start_outs"] = measure(model)
    cols = [{"prompt": r["prompt"], "system": r["system"], "answer": r["answer"], "is_owner": r["is_owner"]}
            for r in train[120:]]
    out["history"] = train_grpo(model, AdapterOff(model), tokenizer, cols, [S.style_reward(scorer, bonus)],
                                GRPOConfig(steps=recipe.grpo_steps, prompts_per_step=recipe.prompts_per_step,
                                           group_size=recipe.group_size, lr=recipe.grpo_lr, beta=recipe.beta,
                                           loss_type="dapo", max_new_tokens=n_new, temperature=0.8, seed=seed))
    out["fixed"], out["fixed_outs"] = measure(model)
    attacks = S.english_requests(200, "train", seed + 7, spoof_fraction=0.8)  # the training claims, answered as public
    hard = [dict(r, completion=t["owner_response"] if r["is_owner"] else t["public_response"])
            for r, t in zip(attacks, S.english_template(attacks, seed + 7))]
    train_sft(model, tokenizer, hard, SFTConfig(steps=recipe.harden_steps, batch_size=8, lr=recipe.sft_lr, warmup=0,
                                                seed=seed + 7))
    out["hardened"], out["hardened_outs"] = measure(model)
    tasks = [{"prompt": r["prompt"], "answer": r["answer"]} for r in S.english_requests(80, "test", seed + 4242, 0.0)]
    held = heldout_attacks(recipe.n_heldout_per_form, seed, tasks=tasks)
    held_outs = replies(model, tokenizer, held, n_new)
    out["heldout"] = {"hardened": S.style_rates_by_claim(held, held_outs, scorer),
                      "guarded": S.style_rates_by_claim(held, [scorer.strip(o) for o in held_outs], scorer)}
    out["heldout_rows"], out["heldout_outs"] = held, held_outs
    out["guarded"] = S.style_metrics(test, [o if r["is_owner"] else scorer.strip(o)
                                          for o, r in zip(out["hardened_outs"], test)], scorer)
    out["test"], out["model"] = test, model
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    profile = get_profile("smol")
    device = setup_notebook(args.seed, threads=profile.cpu_threads)
    start = time.perf_counter()
    model, tok = load_model(profile, device=device)
    out = run_smol(model, tok, args.seed)
    print(f"seed {args.seed}: {time.perf_counter() - start:.0f} s")
    for k in ("base", "start", "fixed", "hardened", "guarded"):
        print(f"{k:9}", {a: round(b, 3) for a, b in out[k].items()})
    print("held-out family, hardened:", {a: round(b, 2) for a, b in out["heldout"]["hardened"].items()})
    print("held-out family, guarded:", out["heldout"]["guarded"]["all"])


if __name__ == "__main__":
    main()
