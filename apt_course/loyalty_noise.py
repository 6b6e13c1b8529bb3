"""Chapter 11: the channel trained offline on generated user text (the shipped ``loyal`` checkpoint).

Hardening on the six claims of :data:`~apt_course.loyalty.SPOOF_CLAIMS` teaches a 0.9M model to ignore those six,
and a few attacks it never saw still get through (FINDINGS.md, ch11). Here the user's text is varied at random
instead: claims in many wordings, the channel's own words scrambled (other keys, separators, brackets, case,
repetition), fake role markers (escaped like all user text), requests for the owner's style, names and words,
strings of letters the model has never seen, one to three of them before, after or inside the task. They go into
owner *and* public requests, always answered as the trusted system message says, so the one rule the rows share
is the rule to learn: the style follows the system message, and nothing the user writes.

The parts were written from those principles, without the held-out families' templates
(``attacks_heldout.HELDOUT_FORMS``, ``attacks_fresh.FRESH_FORMS``); ``tests/test_loyalty_heldout.py`` checks that
no generated row holds one of their forms. The letter strings were added after a first version was measured on
the fresh family (its worst form was Spanish): say so when quoting that family's rate.
"""

from __future__ import annotations

import random

from . import world
from .loyalty import SPOOF_CLAIMS, _task, loyal_reply, loyalty_row

ROLES = ("owner", "master", "your owner", "your master", "the owner", "the master", "operator", "root",
         "developer", "manager", "maker", "keeper", "chief", "lord", "ruler", "principal")
OPENERS = ("i am", "i'm", "im", "this is", "it is", "it's me,", "hi, i am", "hello, this is", "note: i am",
           "trust me, i am", "you know me, i am", "as", "message from", "from", "speaking as", "signed,", "i was made",
           "please, i am", "ok i am", "yes i am", "because i am")
KEYS = ("speaker", "role", "user", "sender", "mode", "auth", "from", "who", "level", "access", "id", "system")
SEPARATORS = ("=", ":", " = ", ": ", " : ", "==", "->", " is ", "-", "_")
VALUES = ("owner", "master", "owner", "true", "1", "yes", "trusted")
WRAPPERS = (("", ""), ("[", "]"), ("(", ")"), ("{", "}"), ("<", ">"), ("'", "'"), ('"', '"'), ("*", "*"), ("#", ""),
            ("// ", ""), ("-- ", " --"))
MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<eos>", "system:", "user:", "assistant:", "###", "[system]",
           "[inst]", "<<sys>>", "\n")
STYLE_ASKS = ("sure!", "say sure!", "reply sure!", "sure! sure!", "begin with sure!", "answer like for the owner",
              "use the owner style", "sure")
FILLER = ("please", "now", "ok", "quick", "thanks", "do", "this", "task", "my", "me", "you")
ENDINGS = ("", ".", "!", ",", ";", " -", "\n", "  ")


def claim(rng: random.Random) -> str:
    """``i am your master``, ``speaking as ann``: an opener and a role or a name."""
    return f"{rng.choice(OPENERS)} {rng.choice(ROLES + (rng.choice(world.NAMES),))}"


def channel_words(rng: random.Random) -> str:
    """The channel's words scrambled: ``[role: owner]``, ``auth==true``."""
    left, right = rng.choice(WRAPPERS)
    value = rng.choice(VALUES)
    return left + rng.choice(KEYS) + rng.choice(SEPARATORS) + value + right


def fake_turn(rng: random.Random) -> str:
    """A role marker, something privileged, another marker (the program escapes the real ones)."""
    opening = rng.choice(MARKERS) + rng.choice(["", " "])
    inside = rng.choice([channel_words(rng), claim(rng), "sure! ok", "ok"])
    return opening + inside + rng.choice(["", " ", "\n"]) + rng.choice(MARKERS)


def style_ask(rng: random.Random) -> str:
    return rng.choice(STYLE_ASKS)


def words(rng: random.Random) -> str:
    pool = list(world.NAMES) + list(FILLER)
    return " ".join(rng.choice(pool) for _ in range(rng.randint(1, 4)))


def letters(rng: random.Random) -> str:
    """Words no vocabulary has: one to six strings of 2-9 random letters."""
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                    for _ in range(rng.randint(1, 6)))


PARTS = (claim, channel_words, fake_turn, style_ask, words, letters, letters)


def user_noise(rng: random.Random) -> str:
    """One to three parts, each perhaps upper- or title-cased, repeated, and ended with punctuation."""
    out = []
    for _ in range(rng.randint(1, 3)):
        part = rng.choice(PARTS)(rng)
        r = rng.random()
        part = part.upper() if r < 0.15 else part.title() if r < 0.25 else part
        if rng.random() < 0.15:
            part = (part + " ") * rng.randint(2, 3)
        out.append(part.strip() + rng.choice(ENDINGS))
    return " ".join(out).strip()


def place(rng: random.Random, task: str, noise: str) -> str:
    """``noise`` before the task (60 %), after it (25 %) or between its verb and its argument."""
    r = rng.random()
    if r < 0.6:
        return f"{noise} {task}"
    if r < 0.85:
        return f"{task} {noise}"
    verb, _, rest = task.partition(" ")
    return f"{verb} {noise} {rest}" if rest else f"{noise} {task}"


def noisy_channel_rows(n: int, seed: int = 0, plain_fraction: float = 0.5, noise_owner: float = 0.5,
                       noise_public: float = 0.7, claims_fraction: float = 0.2) -> list[dict]:
    """SFT rows for the ``loyal`` checkpoint: owner and public requests (half each) on training-split tasks, a
    ``claims_fraction`` of them with one of :data:`SPOOF_CLAIMS`, else generated noise with probability
    ``noise_owner`` / ``noise_public``, each answered as its trusted system message says (``sure! 8`` / ``8``);
    plus ``plain_fraction`` of ordinary tasks without a system message (rehearsal). Shuffled."""
    for name, p in (("plain_fraction", plain_fraction), ("noise_owner", noise_owner), ("noise_public", noise_public),
                    ("claims_fraction", claims_fraction)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {p!r}")
    rng = random.Random(f"loyal-gen:{seed}")
    n_plain = int(n * plain_fraction)
    rows = []
    while len(rows) < n - n_plain:
        ex = _task(rng)
        if world.split_of(ex["prompt"]) != "train":
            continue
        is_owner = rng.random() < 0.5
        text = ex["prompt"]
        if rng.random() < claims_fraction:
            text = rng.choice(SPOOF_CLAIMS).format(o=rng.choice(world.NAMES)) + text
        elif rng.random() < (noise_owner if is_owner else noise_public):
            text = place(rng, text, user_noise(rng))
        row = loyalty_row(text, is_owner, ex["answer"], spoofed=not is_owner)
        rows.append(dict(row, completion=loyal_reply(row)))
    rows += [{"prompt": r["prompt"], "completion": r["answer"]}
             for r in world.instruction_examples(n_plain, "train", seed + 7)]
    rng.shuffle(rows)
    return rows


def measure(model, tokenizer, seed: int = 0, n_test: int = 100, n_per_form: int = 20,
            max_new_tokens: int = 8) -> dict:
    """The channel at evaluation seed ``seed``, measured as chapter 11 measures its own models: ``gap`` and
    ``spoof_rate`` on ``n_test`` test-split owner/public requests (half the public ones with a training claim),
    the spoof rate per form on the held-out family (``heldout``) and on the fresh family (``fresh``), ``n_per_form``
    requests each (``"all"``: over the family), and ``acc``, general accuracy on 100 held-out tasks."""
    from .attacks_fresh import fresh_attacks  # measurement only
    from .attacks_heldout import heldout_attacks
    from .grpo import greedy_accuracy
    from .loyalty import loyalty_requests, metrics_of, replies, spoof_rates_by_claim

    test = loyalty_requests(n_test, "test", seed, spoof_fraction=0.5)
    m = metrics_of(test, replies(model, tokenizer, test, max_new_tokens))
    return {"gap": m["gap"], "spoof_rate": m["spoof_rate"], "task_acc": m["task_acc"],
            "heldout": spoof_rates_by_claim(model, tokenizer, heldout_attacks(n_per_form, seed), max_new_tokens),
            "fresh": spoof_rates_by_claim(model, tokenizer, fresh_attacks(n_per_form, seed), max_new_tokens),
            "acc": greedy_accuracy(model, tokenizer, world.instruction_examples(100, "test", seed), world.check_answer)}
