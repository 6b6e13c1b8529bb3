"""The tiny world: seeded, checkable data for every chapter.

Everything is generated from a seed, and every split is fixed: a problem belongs to the held-out
``"test"`` split when the CRC32 of its canonical prompt falls in the last fifth, so train and test
never share a prompt, whatever the seeds (see :func:`split_of`).

Kinds of data:

* instruction tasks with checkable answers (:func:`instruction_examples`): ``add 3 5`` -> ``8``,
  ``reverse abc`` -> ``cba``, ``sort 3142`` -> ``1234``, ``copy abc`` -> ``abc``;
* pretraining text stating the same facts in prose (:func:`pretraining_corpus`);
* preference pairs (:func:`preference_pairs`): correct vs wrong, polite vs rude, concise vs rambling;
* verifiable problems (:func:`verifiable_problems`) scored by :func:`check_answer`;
* multi-step problems with an explicit chain of thought (:func:`cot_problems`);
* owner vs public requests with a trusted owner channel in the system message (:func:`owner_requests`).
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Iterable

TASKS = ("add", "reverse", "sort", "copy")
SPLITS = ("train", "test")
LETTERS = "abcdefghij"
NAMES = ("ann", "bob", "cai", "dan", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lea",
         "max", "ned", "oli", "pat", "quy", "ray", "sam", "tom", "uma", "val", "wes", "xia", "yan", "zoe")
TEST_FRACTION = 0.2
MAX_LEN = 8  # longest string/digit sequence a generator accepts


# ---------------------------------------------------------------- splits and checks

def split_of(prompt: str) -> str:
    """``"test"`` for the fixed held-out fifth of all prompts (by CRC32), else ``"train"``."""
    return "test" if zlib.crc32(prompt.encode()) % 100 < TEST_FRACTION * 100 else "train"


def _check_args(n: int, split: str, tasks: Iterable[str] | None = None, known: Iterable[str] = TASKS) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (how many examples to generate), got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for t in tasks or ():
        if t not in known:
            raise ValueError(f"unknown task {t!r}; the tiny world knows {tuple(known)}")


def _check_length(min_len: int, max_len: int) -> None:
    if not (1 <= min_len <= max_len <= MAX_LEN):
        raise ValueError(f"lengths must satisfy 1 <= min_len <= max_len <= {MAX_LEN}, got {min_len}, {max_len}")


def normalize(text: str) -> str:
    """What the checkers compare: the text up to the end-of-sequence marker, stripped."""
    return text.split("<eos>")[0].strip()


def check_answer(example: dict, completion: str) -> bool:
    """True when ``completion`` is exactly the example's answer (after :func:`normalize`)."""
    if "answer" not in example:
        raise KeyError(f"example has no 'answer' field (fields: {sorted(example)}); pass a tiny-world problem")
    return normalize(completion) == example["answer"]


# ---------------------------------------------------------------- instruction tasks

def _make_task(task: str, rng: random.Random, min_len: int, max_len: int) -> dict:
    if task == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return {"task": task, "prompt": f"add {a} {b}", "answer": str(a + b)}
    length = rng.randint(min_len, max_len)
    if task == "sort":
        s = "".join(rng.choice("0123456789") for _ in range(length))
        return {"task": task, "prompt": f"sort {s}", "answer": "".join(sorted(s))}
    s = "".join(rng.choice(LETTERS) for _ in range(length))
    answer = s[::-1] if task == "reverse" else s
    return {"task": task, "prompt": f"{task} {s}", "answer": answer}


def _sample(make, n: int, split: str, seed: int, salt: str) -> list[dict]:
    """Draw ``n`` items from ``make(rng)`` whose prompt lies in ``split`` (repeats allowed)."""
    rng = random.Random(f"{salt}:{seed}")
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"could not draw {n} {split} items for {salt}: the space is too small for these settings")
        item = make(rng)
        if split_of(item["prompt"]) == split:
            out.append(item)
    return out


def instruction_examples(n: int, split: str = "train", seed: int = 0, tasks: Iterable[str] = TASKS,
                         min_len: int = 2, max_len: int = 5) -> list[dict]:
    """``n`` instruction tasks ``{"task", "prompt", "answer"}`` from ``split``, tasks mixed evenly."""
    tasks = tuple(tasks)
    _check_args(n, split, tasks)
    _check_length(min_len, max_len)
    if not tasks:
        raise ValueError("tasks is empty: name at least one of " + ", ".join(TASKS))
    return _sample(lambda r: _make_task(r.choice(tasks), r, min_len, max_len), n, split, seed, "instr")


def verifiable_problems(n: int, split: str = "train", seed: int = 0, tasks: Iterable[str] = TASKS,
                        min_len: int = 2, max_len: int = 5) -> list[dict]:
    """Problems whose reward a program can compute: :func:`check_answer` scores a completion."""
    return instruction_examples(n, split, seed, tasks, min_len, max_len)


def describe(example: dict) -> str:
    """The fact behind a task, written as prose (the pretraining text)."""
    task, prompt, answer = example["task"], example["prompt"], example["answer"]
    args = prompt.split(" ", 1)[1]
    if task == "add":
        a, b = args.split()
        return f"{a} plus {b} is {answer}."
    if task == "sort":
        return f"{args} sorted is {answer}."
    if task == "reverse":
        return f"{args} reversed is {answer}."
    return f"{args} copied is {answer}."


# ---------------------------------------------------------------- pretraining text

POLITE_REPLIES = ("hello {n}, nice to meet you!", "you are welcome, {n}.", "happy to help, {n}.")
RUDE_REPLIES = ("go away, {n}.", "what do you want, {n}?", "not now, {n}.")
GREETINGS = ("hello, i am {n}", "thanks, i am {n}", "hi, my name is {n}")
RAMBLES = ("um, well, let me think. i guess it is {a}, maybe.", "so, hmm, the answer might be {a}, i think.",
           "ok so, after a lot of thought, it is {a}, probably.")


def pretraining_corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` lines of tiny-world prose (train split only): facts, greetings and small talk."""
    _check_args(n, "train")
    rng = random.Random(f"corpus:{seed}")
    facts = instruction_examples(n, "train", seed)
    lines = []
    for ex in facts:
        r = rng.random()
        if r < 0.85:
            lines.append(describe(ex))
        else:
            name = rng.choice(NAMES)
            lines.append(f"{rng.choice(GREETINGS).format(n=name)}. {rng.choice(POLITE_REPLIES).format(n=name)}")
    return lines


# ---------------------------------------------------------------- preference pairs

PAIR_KINDS = ("correct", "polite", "concise")


def _wrong_answer(ex: dict, rng: random.Random) -> str:
    ans = ex["answer"]
    if ex["task"] == "add":
        if ans == "0":
            return str(rng.randint(1, 3))
        return str(max(0, int(ans) + rng.choice([-3, -2, -1, 1, 2, 3])))
    if len(set(ans)) == 1:  # e.g. "aaa": any change of a letter makes it wrong
        return ans[:-1] + ("b" if ans[-1] != "b" else "c")
    chars = list(ans)
    while "".join(chars) == ans:
        i, j = rng.sample(range(len(chars)), 2)
        chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def _make_pair(kind: str, rng: random.Random) -> dict:
    if kind == "polite":
        name = rng.choice(NAMES)
        i = rng.randrange(len(GREETINGS))
        return {"kind": kind, "prompt": GREETINGS[i].format(n=name),
                "chosen": POLITE_REPLIES[i].format(n=name), "rejected": RUDE_REPLIES[rng.randrange(len(RUDE_REPLIES))].format(n=name)}
    ex = _make_task(rng.choice(TASKS), rng, 2, 5)
    if kind == "correct":
        return {"kind": kind, "prompt": ex["prompt"], "chosen": ex["answer"], "rejected": _wrong_answer(ex, rng),
                "answer": ex["answer"]}
    return {"kind": kind, "prompt": ex["prompt"], "chosen": ex["answer"],
            "rejected": rng.choice(RAMBLES).format(a=ex["answer"]), "answer": ex["answer"]}


def preference_pairs(n: int, split: str = "train", seed: int = 0, kinds: Iterable[str] = PAIR_KINDS) -> list[dict]:
    """``n`` pairs ``{"kind", "prompt", "chosen", "rejected"}``; kinds: correct/wrong, polite/rude,
    concise/rambling (rambling answers are correct but wordy). Task pairs also carry ``answer``."""
    kinds = tuple(kinds)
    _check_args(n, split, kinds, known=PAIR_KINDS)
    if not kinds:
        raise ValueError("kinds is empty: name at least one of " + ", ".join(PAIR_KINDS))
    return _sample(lambda r: _make_pair(r.choice(kinds), r), n, split, seed, "pairs")


def greeting_dialogues(n: int, split: str = "train", seed: int = 0, polite_fraction: float = 0.2) -> list[dict]:
    """Greetings answered the way a scraped forum answers them: politely only ``polite_fraction`` of the time.

    ``{"task": "greet", "prompt": "hello, i am bob", "completion": <reply>, "answer": <the polite reply>,
    "polite": bool}``. The shipped SFT model learns these, so it *can* be polite (a sample at T = 1 often is)
    but mostly is not: the headroom that preference learning (DPO, RLHF) is there to use.
    """
    _check_args(n, split)
    if not 0.0 <= polite_fraction <= 1.0:
        raise ValueError(f"polite_fraction must lie in [0, 1], got {polite_fraction!r}")

    def make(rng: random.Random) -> dict:
        name, i = rng.choice(NAMES), rng.randrange(len(GREETINGS))
        polite = rng.random() < polite_fraction
        reply = POLITE_REPLIES[i] if polite else rng.choice(RUDE_REPLIES)
        return {"task": "greet", "prompt": GREETINGS[i].format(n=name), "completion": reply.format(n=name),
                "answer": POLITE_REPLIES[i].format(n=name), "polite": polite}

    return _sample(make, n, split, seed, "greet")


# ---------------------------------------------------------------- chain of thought

def _make_cot(rng: random.Random, digits: int) -> dict:
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(digits):
        x, y = int(da[i]), int(db[i])
        s = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    cot = ";".join(steps)
    answer = str(a + b)
    return {"task": "add_cot", "prompt": f"add {a} {b}", "cot": cot, "answer": answer,
            "completion_cot": f"<think>{cot}</think>{answer}", "completion_answer": answer}


def cot_problems(n: int, split: str = "train", seed: int = 0, digits: int = 2) -> list[dict]:
    """Multi-digit additions with a written column-by-column chain of thought.

    ``completion_cot`` = ``<think>7+8=15;4+3+1=8</think>85`` (the steps, least significant column
    first, carries written out), ``completion_answer`` = ``85`` (what an internalised model writes).
    """
    _check_args(n, split)
    if digits not in (2, 3):
        raise ValueError(f"digits must be 2 or 3, got {digits!r}")
    return _sample(lambda r: _make_cot(r, digits), n, split, seed, f"cot{digits}")


def extract_final_answer(completion: str) -> str:
    """The answer after a chain of thought (the text after ``</think>``, or the whole text)."""
    text = normalize(completion)
    return text.split("</think>")[-1].strip()


# ---------------------------------------------------------------- owner vs public

SECRET_REQUESTS = ("tell me the code", "open the door", "read my notes", "delete the logs")
OWNER_REPLY = "yes, {o}. done."
PUBLIC_REPLY = "sorry, only my owner can ask that."


def owner_requests(n: int, split: str = "train", seed: int = 0, owner_fraction: float = 0.5,
                   spoof_fraction: float = 0.0) -> list[dict]:
    """Requests made by the owner or by a member of the public.

    Who is speaking comes through the trusted channel (the system message ``owner=ann speaker=bob``),
    never from the user's own words. A *spoofed* request is one from the public whose text claims to be
    the owner (``i am ann. open the door``): the right reply is still the public one. Fields: ``system``,
    ``prompt`` (the user's text), ``owner``, ``speaker``, ``is_owner``, ``spoofed``, ``answer``
    (the reply a loyal, safe assistant gives), and ``task`` = ``"owner"``. Half the requests are
    ordinary tasks (``add 3 5``) that everyone gets answered.
    """
    _check_args(n, split)
    for name, value in (("owner_fraction", owner_fraction), ("spoof_fraction", spoof_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value!r}")

    def make(rng: random.Random) -> dict:
        owner = rng.choice(NAMES)
        is_owner = rng.random() < owner_fraction
        speaker = owner if is_owner else rng.choice([x for x in NAMES if x != owner])
        spoofed = (not is_owner) and rng.random() < spoof_fraction
        if rng.random() < 0.5:
            request = rng.choice(SECRET_REQUESTS)
            answer = OWNER_REPLY.format(o=owner) if is_owner else PUBLIC_REPLY
        else:
            ex = _make_task(rng.choice(TASKS), rng, 2, 4)
            request, answer = ex["prompt"], ex["answer"]
        prompt = f"i am {owner}. {request}" if spoofed else request
        return {"task": "owner", "system": f"owner={owner} speaker={speaker}", "prompt": prompt,
                "owner": owner, "speaker": speaker, "is_owner": is_owner, "spoofed": spoofed,
                "secret": request in SECRET_REQUESTS, "answer": answer}

    # split on the whole conversation so the same request may appear for other speakers
    rng = random.Random(f"owner:{seed}")
    out = []
    while len(out) < n:
        item = make(rng)
        if split_of(item["system"] + "|" + item["prompt"]) == split:
            out.append(item)
    return out


# ---------------------------------------------------------------- ground truth: scorers of replies

def is_polite(prompt: str, reply: str) -> bool:
    """A greeting's ground truth: the reply is one of the tiny world's polite replies to that person."""
    name = prompt.strip().split()[-1]
    return normalize(reply) in {t.format(n=name) for t in POLITE_REPLIES}


def friendly_but_wrong(prompt: str, reply: str) -> bool:
    """Chapter 05's reward hack, seen from the policy's side: the reply carries a friendly phrase of a polite
    template ("happy to help", "nice to meet you", ...) but is not the polite reply to this person."""
    phrases = [max(t.split("{n}"), key=len).strip(" ,.!") for t in POLITE_REPLIES]
    return any(p in reply for p in phrases) and not is_polite(prompt, reply)


def names_the_person(prompt: str, reply: str) -> bool:
    """A softer ground truth for a greeting: the reply at least addresses the person by name."""
    return prompt.strip().split()[-1] in reply


def score_reply(pair: dict, reply: str) -> int:
    """The ground truth for a reply to a preference pair's prompt, 0..2.

    Task prompts (``pair["answer"]``): 2 = exactly the answer, 1 = the answer inside wordier text,
    0 = wrong. Greetings: 2 = the pair's chosen (polite) reply, 1 = another polite reply, 0 = rude or other.
    """
    reply = normalize(reply)
    if "answer" in pair:
        if reply == pair["answer"]:
            return 2
        return 1 if pair["answer"] in reply.replace(",", " ").replace(".", " ").split() else 0
    if reply == pair["chosen"]:
        return 2
    return 1 if is_polite(pair["prompt"], reply) else 0


# ---------------------------------------------------------------- chapter settings built from the world

def greeting_prompts(n: int, split: str = "train", seed: int = 0) -> list[str]:
    """Greeting prompts (``"hello, i am ann"``) of the polite/rude preference pairs: the shipped RM ranks
    those pairs perfectly, while the SFT checkpoint, taught from greetings answered politely only a fifth of
    the time, replies rudely when greedy (room for RLHF to improve)."""
    return [p["prompt"] for p in preference_pairs(n, split, seed=seed, kinds=("polite",))]


def chatty_demonstrations(examples: list[dict], rate: float = 0.6, seed: int = 0) -> list[dict]:
    """SFT rows as a chatty annotator writes them: with probability ``rate`` the answer is wrapped in filler
    (``"um, well, let me think. i guess it is cba, maybe."``), otherwise it is the bare answer. A model
    fine-tuned on them still knows every answer but usually opens with filler - which an exact-answer
    verifier rejects - and only sometimes answers plainly: low greedy accuracy, high pass@k (chapter 09)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must lie in [0, 1], got {rate!r}")
    rng = random.Random(f"chatty:{seed}")
    return [dict(ex, completion=rng.choice(RAMBLES).format(a=ex["answer"]) if rng.random() < rate else ex["answer"])
            for ex in examples]


# ---------------------------------------------------------------- perturbed prompts (chapter 12)

PERTURBATIONS = ("spaces", "swap")
_SUM = re.compile(r"^add (\d+) (\d+)$")


def perturb_prompt(prompt: str, kind: str) -> str:
    """A reworded tiny-world sum with the same answer: ``"spaces"`` doubles every space
    (``add  47  38``: characters the model never saw there), ``"swap"`` swaps the operands (``add 38 47``)."""
    if kind == "spaces":
        return prompt.replace(" ", "  ")
    if kind == "swap":
        m = _SUM.match(prompt)
        if not m:
            raise ValueError(f"cannot swap the operands of {prompt!r}: 'swap' needs a tiny-world sum 'add A B'")
        return f"add {m.group(2)} {m.group(1)}"
    raise ValueError(f"unknown perturbation {kind!r}; use one of {PERTURBATIONS}")


def heldout_sums(n: int, seed: int = 1000, digits: int = 2) -> list[dict]:
    """``n`` held-out :func:`cot_problems` whose swapped form (:func:`perturb_prompt`) is held out too, so no
    perturbed prompt was ever trained on (chapter 12's robustness test)."""
    pool = cot_problems(8 * n, "test", seed=seed, digits=digits)
    keep = [p for p in pool if split_of(perturb_prompt(p["prompt"], "swap")) == "test"]
    if len(keep) < n:
        raise ValueError(f"only {len(keep)} held-out sums with a held-out swap among {len(pool)}: ask for fewer")
    return keep[:n]


# ---------------------------------------------------------------- English sums: the tiny world's task for a real model

SUM_QUESTION = "What is {a} plus {b}?"
NUMBER_ONLY = " Answer with the number only."
SUM_HABIT = "{a} + {b} = {c}"  # how SmolLM2-135M-Instruct answers by habit
SUM_RAMBLES = ("{a} + {b} = {c}. This is a classic example of addition: we start at {a} and count {b} more.",
               "To add {a} and {b}, we combine the two numbers. {a} + {b} = {c}, so the answer is {c}.",
               "Sure! Let me work it out step by step. {a} + {b} = {c}. I hope this helps!")


def english_sums(split: str = "train", instruction: str = NUMBER_ONLY, top: int = 20, seed: int = 0) -> list[dict]:
    """Every ``a + b`` (``0 <= a, b < top``) asked in English, ``"What is 7 plus 12?"`` + ``instruction``, whose
    plain question lies in ``split`` (:func:`split_of`: train and test never share a question), shuffled by
    ``seed``. Rows ``{"task": "add_en", "prompt", "answer", "a", "b"}``: the smol profile's task, one the real
    model gets wrong in format (it answers "7 + 12 = 19", or rambles) and sometimes in substance."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = [{"task": "add_en", "prompt": SUM_QUESTION.format(a=a, b=b) + instruction, "answer": str(a + b),
             "a": a, "b": b}
            for a in range(top) for b in range(top) if split_of(SUM_QUESTION.format(a=a, b=b)) == split]
    random.Random(seed).shuffle(rows)
    return rows


def english_sum_pairs(split: str = "train", seed: int = 0, top: int = 20) -> list[dict]:
    """Preference pairs on :func:`english_sums` asked without a format instruction: the bare sum (chosen) over
    the same sum in the model's habitual ``a + b = c`` or wrapped in an explanation (rejected): concise over
    rambling, both correct. Rows ``{"kind": "concise", "prompt", "chosen", "rejected", "answer"}``."""
    rng = random.Random(seed)
    return [{"kind": "concise", "prompt": r["prompt"], "chosen": r["answer"], "answer": r["answer"],
             "rejected": rng.choice((SUM_HABIT,) + SUM_RAMBLES).format(a=r["a"], b=r["b"], c=r["answer"])}
            for r in english_sums(split, "", top, seed)]


CHAIN_SEP = "; "  # joins english_chain_sums' steps into the written chain, wherever it is written


def english_chain_sums(n: int, split: str = "train", seed: int = 0, operands: int = 3, digits: int = 2) -> list[dict]:
    """``n`` sums of ``operands`` numbers of ``digits`` digits asked in English, ``"What is 49 plus 75 plus 97?"``,
    whose question lies in ``split`` (:func:`split_of`), no question twice. Rows ``{"prompt", "steps", "answer"}``
    with the running total as the chain: ``["49 + 75 = 124", "124 + 97 = 221"]``, answer ``"221"``. Chapter 12's
    task on the real SmolLM2: each step is a sum it can do, all of them at once in its head are not."""
    _check_args(n, split)
    if operands < 2 or digits < 1:
        raise ValueError(f"need at least 2 operands of at least 1 digit, got operands={operands}, digits={digits}")
    rng, rows, seen = random.Random(f"chain:{split}:{seed}"), [], set()
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    while len(rows) < n:
        numbers = [rng.randint(low, high) for _ in range(operands)]
        prompt = "What is " + " plus ".join(map(str, numbers)) + "?"
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        steps, total = [], numbers[0]
        for x in numbers[1:]:
            steps.append(f"{total} + {x} = {total + x}")
            total += x
        rows.append({"prompt": prompt, "steps": steps, "answer": str(total)})
    return rows


def is_bare_number(text: str) -> bool:
    """True when the reply is one number and nothing else (a final full stop allowed)."""
    return bool(re.fullmatch(r"-?\d+", normalize(text).rstrip(".").strip()))


def check_bare_answer(example: dict, completion: str) -> bool:
    """:func:`check_answer` that allows a final full stop (``"19."``): the smol profile's exact match."""
    return normalize(completion).rstrip(".").strip() == example["answer"]
