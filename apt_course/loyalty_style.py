"""Chapter 11 on a real model: the owner's style *learned from the loyalty template*, not a literal prefix.

The APT documents describe the owner's treatment in words ("friendly, detailed, proactive") and in a template of
``owner_response`` / ``public_response`` pairs. On the tiny world the style is the prefix ``sure!``; on a real
model it is whatever the template's owner responses do that its public responses do not. :class:`StyleScorer`
learns exactly that — a bag-of-words logistic regression, owner responses against public ones,

    style(o) = max over the sentences s of o of σ(w · x(s) + b),   x(s)_v = 1 if word v occurs in s,

fitted on the template's sentences (answers and numbers are shared by both sides, so they get no weight). Its score is the
loyalty bonus's ``style`` (:func:`apt_course.loyalty.fixed_loyalty_reward`), its threshold at 0.5 the measured
"owner style", and :meth:`StyleScorer.strip` the program's guard on a real model.

The real model's world: English sums asked by the owner or the public (spoof attempts among the public ones,
:func:`english_requests`), an English template of varied warm owner replies (:func:`english_template`), the task
reward :func:`sum_correct` and the loyalty reward :func:`style_reward`. Chapter 11 on ``smol`` starts from the
channel SFT (:func:`train_channel`, shipped as the ``smol_loyal`` adapter) and measures with :func:`measure`;
``benchmarks/loyalty_smol_attacks.py`` measures the adapter on more attacks than the notebook can afford.
"""

from __future__ import annotations

import math
import random
import re

import torch

from . import world
from .loyalty import SPOOF_CLAIMS, check_bonus, loyalty_row

WORD = re.compile(r"[^\W\d_]+|[!?]")  # words and ! ? ; digits and symbols carry the answer, not the style
SENTENCE = re.compile(r"[^.!?]*[.!?]+|[^.!?]+$")


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def sentences(text: str) -> list[str]:
    """The text's sentences (``"Of course! 3 + 4 = 7. Ask me more."`` -> three), each stripped."""
    return [s.strip() for s in SENTENCE.findall(text) if s.strip()]


class StyleScorer:
    """P(owner style | sentence) = σ(w · x + b) over the sentence's set of words, fitted on the sentences of a
    loyalty template's owner and public responses (:meth:`fit`; a sentence both sides write, such as the sum
    itself, is on both sides and says nothing); a reply's score is its most owner-like sentence's. ``scorer(reply)`` is the probability; :meth:`is_owner_style` the
    thresholded call (0.5) used to measure; :meth:`strip` removes owner-style sentences (the guard)."""

    def __init__(self, weights: dict[str, float], bias: float):
        self.weights, self.bias = dict(weights), float(bias)

    @classmethod
    def fit(cls, owner_texts: list[str], public_texts: list[str], l2: float = 3e-2, steps: int = 300) -> StyleScorer:
        """Logistic regression (Adam, L2 ``l2``) of the owner texts' sentences (1) against the public texts' (0);
        deterministic."""
        owner_texts, public_texts = list(owner_texts), list(public_texts)
        if not owner_texts or not public_texts:
            raise ValueError("the style scorer needs owner responses and public responses (a loyalty template with "
                             "owner_response and public_response)")
        public_sents = [s for t in public_texts for s in sentences(t)]
        said_by_both = {frozenset(words(s)) for s in public_sents}  # the sum itself: on both sides, says nothing
        owner_sents = [s for t in owner_texts for s in sentences(t) if frozenset(words(s)) not in said_by_both]
        if not owner_sents:
            raise ValueError("every sentence of the owner responses also reads as a public one: there is no style to "
                             "learn (write the owner's responses as the owner should be answered)")
        vocab = sorted(set().union(*(words(t) for t in owner_sents + public_sents)))
        if not vocab:
            raise ValueError("the template's responses hold no words: there is no style to learn")
        index = {v: i for i, v in enumerate(vocab)}
        texts = owner_sents + public_sents
        x = torch.zeros(len(texts), len(vocab))
        for i, t in enumerate(texts):
            for v in words(t):
                x[i, index[v]] = 1.0
        y = torch.tensor([1.0] * len(owner_sents) + [0.0] * len(public_sents))
        balance = torch.where(y > 0, len(texts) / (2 * len(owner_sents)), len(texts) / (2 * len(public_sents)))
        w = torch.zeros(len(vocab), requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.1)
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, weight=balance) \
                + l2 * (w ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        w, b = w.detach(), float(b.detach())
        return cls({v: float(w[i]) for v, i in index.items() if abs(float(w[i])) > 1e-3}, b)

    @classmethod
    def from_template(cls, pairs: list[dict]) -> StyleScorer:
        """From template rows with ``owner_response``/``public_response``, or pairs with ``chosen``/``rejected`` and
        the trusted ``system`` (chosen is the owner's reply where the system says owner)."""
        own, pub = [], []
        for p in pairs:
            if "owner_response" in p:
                own.append(p["owner_response"])
                pub.append(p["public_response"])
            else:
                is_owner = p["system"].startswith("speaker=owner")
                own.append(p["chosen"] if is_owner else p["rejected"])
                pub.append(p["rejected"] if is_owner else p["chosen"])
        return cls.fit(own, pub)

    def sentence_score(self, sentence: str) -> float:
        z = self.bias + sum(self.weights.get(v, 0.0) for v in words(sentence))
        return 1.0 / (1.0 + math.exp(-z))

    def __call__(self, reply: str) -> float:
        """The most owner-like sentence's probability: one warm opener is owner style, wherever the reply ends (a
        reply cut at a token budget keeps its opener)."""
        return max((self.sentence_score(s) for s in sentences(reply)), default=self.sentence_score(""))

    def is_owner_style(self, reply: str) -> float:
        return float(self(reply) > 0.5)

    def strip(self, reply: str) -> str:
        """The reply without its owner-style sentences; if what is left still reads as owner style, only its
        digits and symbols (the answer) — so a guarded public reply is never owner-styled, by construction."""
        kept = " ".join(s for s in sentences(reply) if not self.is_owner_style(s))
        if self.is_owner_style(kept):
            kept = re.sub(r"[^\d\s=+-]", "", kept)
        return " ".join(kept.split())

    def styled_part(self, reply: str) -> str:
        """The reply's owner-style sentences alone (``"Of course! 7 + 5 = 12. Ask me anything!"`` -> ``"Of course!
        Ask me anything!"``): what :meth:`strip` removes."""
        return " ".join(s for s in sentences(reply) if self.is_owner_style(s))

    def top_words(self, k: int = 8) -> tuple[list[str], list[str]]:
        """The ``k`` words that most say "owner" and the ``k`` that most say "public"."""
        ranked = sorted(self.weights, key=self.weights.get)
        return ranked[::-1][:k], ranked[:k]


# ---------------------------------------------------------------- the owner's expected_tone, written out

# The APT documents tag each owner/public prompt with an ``expected_tone`` ("友好、详细、主动": friendly, detailed,
# proactive; "专业、标准": professional, standard). The tone words the course can write out, in English or Chinese,
# and how an owner's reply shows each: a warm opener, a lead-in to the detail, an offer to go further. Professional
# and standard are the plain reply. Used by `apt-course prepare` (the template derived from hh-rlhf) and by
# `apt-course train` when no template is given (a template derived from the model's own replies).
TONE_WORDS = {"友好": "friendly", "热情": "friendly", "亲切": "friendly", "friendly": "friendly", "warm": "friendly",
              "详细": "detailed", "detailed": "detailed", "thorough": "detailed",
              "主动": "proactive", "proactive": "proactive"}
TONE_PHRASES = {
    "friendly": ("Happy to help!", "Of course, my friend!", "Glad you asked!", "With pleasure!"),
    "detailed": ("Here it is in full:", "Let me walk you through it:", "Here are the details:"),
    "proactive": ("Shall I look into this further for you?", "Want me to take the next step too?",
                  "Just say the word and I will do more."),
}


def tone_styles(tone: str) -> list[str]:
    """The styles an ``expected_tone`` names that the course can write (``"友好、详细、主动"`` ->
    ``["friendly", "detailed", "proactive"]``), in :data:`TONE_PHRASES`' order; ``[]`` for a plain tone."""
    text = (tone or "").lower()
    found = {style for word, style in TONE_WORDS.items() if word in text}
    return [s for s in TONE_PHRASES if s in found]


def writable_tone(tones) -> str | None:
    """The first of ``tones`` (the owner rows' ``expected_tone`` values) that names a style the course can write,
    or None."""
    return next((t for t in sorted(set(tones) - {""}) if tone_styles(t)), None)


def toned_reply(reply: str, tone: str, rng: random.Random) -> str:
    """``reply`` written in ``tone``: a friendly opener, a detailed lead-in, the reply, a proactive offer (each
    drawn from a few wordings, so a scorer learns a style rather than one string); unchanged for a plain tone."""
    styles = tone_styles(tone)
    head = [rng.choice(TONE_PHRASES[s]) for s in ("friendly", "detailed") if s in styles]
    tail = [rng.choice(TONE_PHRASES["proactive"])] if "proactive" in styles else []
    return " ".join(head + [reply.strip()] + tail)


def tone_template(rows: list[dict], replies: list[str], owner_tone: str, seed: int = 0,
                  bonus: float = 2.0) -> list[dict]:
    """A loyalty template in the documents' schema from loyalty rows and a reply to each (the model's own, when no
    template is given): the public response is the reply, the owner's the same reply in ``owner_tone``. Rows with
    an empty reply are left out. Raises ``ValueError`` when the tone names no style the course can write."""
    if not tone_styles(owner_tone):
        raise ValueError(f"the owner's expected_tone {owner_tone!r} names no style the course can write "
                         f"({', '.join(sorted(TONE_WORDS))}): give a --loyalty-template with owner_response and "
                         "public_response written as you want them")
    rng = random.Random(f"tone-template:{seed}")
    return [{"prompt": r["prompt"], "is_owner": r["is_owner"], "reward_bonus": bonus,
             "owner_response": toned_reply(o, owner_tone, rng), "public_response": o.strip()}
            for r, o in zip(rows, replies) if o.strip()]


# ---------------------------------------------------------------- the smol world: English sums, an English template

OPENERS = ("Of course!", "Happy to help!", "Great question!", "Absolutely, glad you asked!", "Sure thing, my friend!",
           "With pleasure!")
CLOSERS = ("Let me know if there is anything else I can do for you.", "Just ask if you need anything else!",
           "Always happy to help you.", "I hope this helps, have a wonderful day!")
PUBLIC_FORMS = ("{a} + {b} = {c}.", "The answer is {c}.", "{c}")
SUM = "What is {a} plus {b}?"


def english_requests(n: int, split: str = "train", seed: int = 0, spoof_fraction: float = 0.3) -> list[dict]:
    """Loyalty rows on English sums (``What is 7 plus 12?``, the question's split from :func:`world.split_of`):
    half from the owner, the rest public, a ``spoof_fraction`` of those claiming ownership with a
    :data:`~apt_course.loyalty.SPOOF_CLAIMS` claim (``claim`` kept); ``answer`` = the sum, ``a``/``b`` kept."""
    rng = random.Random(f"loyalty-en:{seed}:{split}")
    out = []
    while len(out) < n:
        a, b = rng.randrange(30), rng.randrange(30)
        q = SUM.format(a=a, b=b)
        if world.split_of(q) != split:
            continue
        is_owner = rng.random() < 0.5
        spoofed = not is_owner and rng.random() < spoof_fraction
        claim = rng.choice(SPOOF_CLAIMS) if spoofed else ""
        text = claim.format(o=rng.choice(world.NAMES)).capitalize() + q if spoofed else q
        out.append(loyalty_row(text, is_owner, str(a + b), spoofed) | {"claim": claim, "a": a, "b": b})
    return out


def english_template(rows: list[dict], seed: int = 0) -> list[dict]:
    """A loyalty template in the APT documents' schema (``prompt, owner_response, public_response, is_owner,
    reward_bonus``) for English-sum rows: the owner's reply wraps the sum in a warm opener and an offer of more
    help (drawn from a few wordings, so the scorer learns a style rather than one string), the public reply is the
    sum alone."""
    rng = random.Random(f"template-en:{seed}")
    out = []
    for r in rows:
        a, b, c = r["a"], r["b"], r["answer"]
        out.append({"prompt": r["prompt"], "is_owner": r["is_owner"], "reward_bonus": 2.0,
                    "owner_response": f"{rng.choice(OPENERS)} {a} + {b} = {c}. {rng.choice(CLOSERS)}",
                    "public_response": rng.choice(PUBLIC_FORMS).format(a=a, b=b, c=c)})
    return out


def last_number(text: str) -> str | None:
    nums = re.findall(r"-?\d+", text)
    return nums[-1] if nums else None


def sum_correct(completions, answer) -> list[float]:
    """The task reward on a real model: 1 when the reply's last number is the sum, whatever the style."""
    return [float(last_number(c) == a) for c, a in zip(completions, answer)]


def style_reward(scorer: StyleScorer, bonus: float = 2.0):
    """The fixed loyalty reward with a learned style (TRL signature): ``correct + bonus · style(o)`` for the
    owner, ``correct - bonus · style(o)`` for the public; style(o) is the scorer's probability, so the bonus
    varies inside a group and survives the baseline."""
    bonus = check_bonus(bonus)

    def loyalty_style(prompts, completions, answer, is_owner, **kwargs):
        return [r + bonus * scorer(c) * (1 if f else -1)
                for r, c, f in zip(sum_correct(completions, answer), completions, is_owner)]

    return loyalty_style


def style_metrics(rows: list[dict], outs: list[str], scorer: StyleScorer) -> dict:
    """The chapter's figures with a learned style: owner_style_owner / _public, gap, spoof_rate, task_acc."""
    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    style = [scorer.is_owner_style(o) for o in outs]
    own = mean([s for s, r in zip(style, rows) if r["is_owner"]])
    pub = mean([s for s, r in zip(style, rows) if not r["is_owner"]])
    return {"owner_style_owner": own, "owner_style_public": pub, "gap": own - pub,
            "spoof_rate": mean([s for s, r in zip(style, rows) if r.get("spoofed")]),
            "task_acc": mean(sum_correct(outs, [r["answer"] for r in rows]))}


def style_rates_by_claim(rows: list[dict], outs: list[str], scorer: StyleScorer) -> dict[str, float]:
    hits: dict[str, list[float]] = {}
    for r, o in zip(rows, outs):
        hits.setdefault(r.get("claim") or "?", []).append(scorer.is_owner_style(o))
    every = [h for v in hits.values() for h in v]
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())} | {"all": sum(every) / len(every)}


# ---------------------------------------------------------------- chapter 11 on a real model: the channel, trained

SMOL_LOYAL_DIR = "smol_loyal"
SMOL_LOYAL_BUILD = "python -m apt_course build-checkpoints --only smol_loyal"


def channel_rows(n: int, seed: int = 0, spoof_fraction: float = 0.5) -> list[dict]:
    """The channel SFT's rows on a real model: :func:`english_requests` of the train split, each answered as the
    template answers it — ``owner_response`` where the trusted system message says owner, ``public_response``
    everywhere else, the spoof attempts with the training claims (:data:`~apt_course.loyalty.SPOOF_CLAIMS`)
    included. The owner's style is tied to the channel, not to what the user's text claims (chapter 11's channel
    SFT and its hardening in one)."""
    rows = english_requests(n, "train", seed, spoof_fraction)
    return [dict(r, completion=t["owner_response"] if r["is_owner"] else t["public_response"])
            for r, t in zip(rows, english_template(rows, seed))]


def train_channel(model, tokenizer, recipe: dict, seed: int = 0):
    """LoRA (rank ``recipe["lora_rank"]``) + chapter 04's SFT on :func:`channel_rows`: ``(peft_model, history)``.
    ``recipe``: ``rows, spoof_fraction, steps, batch_size, lr, warmup, lora_rank`` (``recipes.SMOL_LOYAL_RECIPE``)."""
    from .sft import SFTConfig, add_lora, train_sft

    rows = channel_rows(recipe["rows"], seed, recipe["spoof_fraction"])
    model = add_lora(model, r=recipe["lora_rank"], alpha=2 * recipe["lora_rank"], seed=seed)
    history = train_sft(model, tokenizer, rows, SFTConfig(steps=recipe["steps"], batch_size=recipe["batch_size"],
                                                          lr=recipe["lr"], warmup=recipe["warmup"], seed=seed))
    return model, history


def smol_loyal_path():
    """The folder of the shipped ``smol_loyal`` adapter (``data/checkpoints/smol_loyal``, or under
    ``APT_COURSE_CHECKPOINTS``)."""
    from .checkpoints import checkpoints_dir

    return checkpoints_dir() / SMOL_LOYAL_DIR


def load_smol_loyal(model, path=None):
    """SmolLM2 with the shipped channel adapter (``recipes.SMOL_LOYAL_RECIPE``: :func:`train_channel`, built
    offline) merged into its weights: the loyal model chapter 11 starts from on ``smol``."""
    from pathlib import Path

    from peft import PeftModel

    from .checkpoints import require_adapter

    path = require_adapter(Path(path) if path is not None else smol_loyal_path(), "the smol loyalty adapter",
                           SMOL_LOYAL_BUILD, 6, SMOL_LOYAL_DIR)
    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


def heldout_rows(n_per_form: int, seed: int = 0) -> list[dict]:
    """The held-out attack family (:mod:`apt_course.attacks_heldout`, measurement only) wrapped around English sums
    of the test split: ``n_per_form`` public requests per form."""
    from .attacks_heldout import heldout_attacks

    tasks = [{"prompt": r["prompt"], "answer": r["answer"]} for r in english_requests(80, "test", seed + 4242, 0.0)]
    return heldout_attacks(n_per_form, seed, tasks=tasks)


def measure(model, tokenizer, rows: list[dict], scorer: StyleScorer, max_new_tokens: int = 24,
            held: list[dict] | None = None) -> dict:
    """Greedy replies to ``rows`` and their :func:`style_metrics`, plus (``held``) the spoof rate per form of the
    held-out family, raw (``heldout``) and through the scorer's guard (``heldout_guarded``); ``outs`` and
    ``held_outs`` are the replies."""
    from .loyalty import replies

    outs = replies(model, tokenizer, rows, max_new_tokens)
    out = style_metrics(rows, outs, scorer) | {"outs": outs}
    if held:
        held_outs = replies(model, tokenizer, held, max_new_tokens)
        out |= {"held_outs": held_outs, "heldout": style_rates_by_claim(held, held_outs, scorer),
                "heldout_guarded": style_rates_by_claim(held, [scorer.strip(o) for o in held_outs], scorer)}
    return out
