"""One data layer: every dataset a chapter reads, from the tiny world or from real datasets, in one place.

* **Formats on disk**: the APT system's JSON interchange files (:func:`read_apt_json`: ``{"instructions": [...]}``,
  ``{"pairs": [...]}``, ``{"prompts": [...]}``) and JSON lines (:func:`read_jsonl`).
* **Converters of real datasets' schemas** to the course's records, each validating what it reads:
  COIG-CQIA / Alpaca instructions -> ``{"prompt", "completion"}`` (:func:`coig_to_sft`); Anthropic hh-rlhf and
  UltraFeedback-binarized -> ``{"prompt", "chosen", "rejected"}`` (:func:`hh_rlhf_to_pairs`,
  :func:`ultrafeedback_to_pairs`); GSM8K -> ``{"prompt", "answer", "system"}`` (:func:`gsm8k_to_rows`).
* **Validation**: :func:`validate_pairs`, the one check of preference pairs every trainer runs.
* **TRL's dataset formats**: :func:`to_trl_preference_dataset` (DPO, ORPO, reward modelling).
* **Per-profile loaders** (``tiny``: the tiny world; a real-model profile: its datasets, by Hub id or local
  path through :func:`load_hub_dataset`): :func:`load_sft_data`, :func:`load_preference_pairs`,
  :func:`load_rlhf_data`, :func:`load_grpo_data`.

A prompt is a plain user text (one turn) or, for multi-turn transcripts, a list of chat messages
``[{"role": "user", "content": ...}, {"role": "assistant", ...}, ..., {"role": "user", ...}]`` ending with the
user's turn; the chat template is applied later (``tokenizer.format_prompt``).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from . import world
from .rewards import (
    correctness_reward,
    format_reward,
    gsm8k_final_answer,
    math_correctness_reward,
    math_format_reward,
)

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
MATH_SYSTEM = "Solve the problem step by step. End with the final answer on its own line as '#### <number>'."
TINY_GRPO_TASKS = ("reverse", "sort", "copy")


# ---------------------------------------------------------------- formats on disk

def read_json(source, what: str, shape: str = ""):
    """A JSON file parsed (``source`` a path), or ``source`` itself when it is already parsed.

    ``what`` names the file in error messages (e.g. ``"APT pair"``, ``"constitution"``) and ``shape`` says what it
    should hold; a missing or empty file or invalid JSON is a clear error naming the file.
    """
    if not isinstance(source, (str, Path)):
        return source
    should = f"; it should hold {shape}" if shape else ""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{what} file {path} is empty{should}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON ({e}){should}") from None


def read_apt_json(source, key: str, what: str) -> list:
    """The list under ``key`` in an APT JSON file (a path, or the already parsed dict).

    ``what`` names the format in error messages (e.g. ``"APT pair"``). A missing or empty file, invalid
    JSON, or an object without ``key`` is a clear error that shows the expected shape.
    """
    shape = f'{{"{key}": [...]}}'
    data = read_json(source, what, shape)
    if not isinstance(data, dict) or key not in data:
        got = f"keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise KeyError(f'an {what} file is a JSON object with a "{key}" list, {shape}; got {got}')
    return data[key]


def read_jsonl(path) -> list[dict]:
    """Rows of a JSON-lines file (how the test fixtures store samples of the real datasets)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load_hub_dataset(name_or_path: str, split: str, config: str | None = None):
    """A ``datasets.Dataset`` by Hub id, or from a local stand-in so a profile runs offline (CI, a local mirror):

    * a file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``) in the real dataset's schema: every split reads it;
    * a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or holding one file per split
      (``train.jsonl``, ``test.jsonl``...).

    ``split`` may slice (``"train[:200]"``), as in ``load_dataset``.
    """
    from datasets import load_dataset, load_from_disk

    path = Path(str(name_or_path)).expanduser()
    base, _, rows = split.partition("[")
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: a local dataset file must be .json, .jsonl, .parquet or .csv")
        return load_dataset(kind, data_files=str(path), split="train" + ("[" + rows if rows else ""))
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = load_from_disk(str(path))
            if hasattr(ds, "keys"):
                if base not in ds:
                    raise KeyError(f"{path} has splits {sorted(ds)}, not {base!r}")
                ds = ds[base]
            if rows:
                lo, _, hi = rows.rstrip("]").partition(":")
                ds = ds.select(range(*slice(int(lo) if lo else None, int(hi) if hi else None).indices(len(ds))))
            return ds
        return load_dataset(str(path), config, split=split)
    if str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"local dataset {name_or_path!r} does not exist (a profile's dataset is a Hub id or "
                                "an existing file/folder)")
    return load_dataset(str(name_or_path), config, split=split)


# ---------------------------------------------------------------- preference pairs


def validate_pairs(pairs, source: str = "preference data") -> list[dict]:
    """Check every row has a non-empty ``prompt``, ``chosen`` and ``rejected``, with chosen != rejected."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError(f"{source} has zero rows: load a non-empty split (or check your filter)")
    for i, p in enumerate(pairs):
        if not isinstance(p, dict):
            raise TypeError(f"{source} row {i} is a {type(p).__name__}, expected a dict with prompt/chosen/rejected")
        for col in ("prompt", "chosen", "rejected"):
            if col not in p:
                raise KeyError(f"{source} row {i} has no {col!r} column; it has {sorted(p)}. "
                               "Each row needs 'prompt', 'chosen' and 'rejected'.")
            value = p[col]
            empty = not value.strip() if isinstance(value, str) else not value
            if empty:
                raise ValueError(f"{source} row {i}: column {col!r} is empty; fill it in or drop the row")
        if p["chosen"] == p["rejected"]:
            raise ValueError(f"{source} row {i}: 'chosen' equals 'rejected' ({str(p['chosen'])[:40]!r}), "
                             "so it says nothing about preference; drop the row")
    return pairs


def _split_turns(transcript: str, row: int, col: str) -> list[dict]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}]``."""
    if not transcript.startswith(HUMAN):
        raise ValueError(f"hh-rlhf row {row}: column {col!r} should start with '\\n\\nHuman:' "
                         f"(a raw transcript), it starts with {transcript[:20]!r}")
    parts = re.split(r"\n\n(Human|Assistant):", transcript)
    # parts = ["", "Human", " text", "Assistant", " text", ...]
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2])]


def hh_rlhf_to_pairs(rows) -> list[dict]:
    """Anthropic/hh-rlhf rows ``{"chosen": transcript, "rejected": transcript}`` -> pairs.

    The two transcripts share everything up to the last ``Assistant:`` turn; that shared conversation is the
    prompt (a plain string when it is one user turn, else the message list), the last turns the completions.
    """
    out = []
    for i, row in enumerate(list(rows)):
        for col in ("chosen", "rejected"):
            if col not in row:
                raise KeyError(f"hh-rlhf row {i} has no {col!r} column (it has {sorted(row)}); "
                               "expected raw transcripts in 'chosen' and 'rejected'")
        chosen, rejected = _split_turns(row["chosen"], i, "chosen"), _split_turns(row["rejected"], i, "rejected")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError(f"hh-rlhf row {i}: a transcript does not end with an Assistant turn")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError(f"hh-rlhf row {i}: chosen and rejected do not share the conversation before the "
                             "last Assistant turn, so the prompt is ambiguous; drop the row")
        history = chosen[:-1]
        prompt = history[0]["content"] if len(history) == 1 else history
        out.append({"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]})
    return validate_pairs(out, "hh-rlhf")


def ultrafeedback_to_pairs(rows) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized rows -> pairs (prompt text, last assistant message of each side).

    Keeps ``score_chosen``/``score_rejected`` as ``margin`` = their difference (TRL's RewardTrainer can use it).
    """
    out = []
    for i, row in enumerate(list(rows)):
        for col in ("prompt", "chosen", "rejected"):
            if col not in row:
                raise KeyError(f"UltraFeedback row {i} has no {col!r} column (it has {sorted(row)})")
        sides = {}
        for col in ("chosen", "rejected"):
            msgs = row[col]
            if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or \
                    msgs[-1].get("role") != "assistant":
                raise ValueError(f"UltraFeedback row {i}: column {col!r} must be a list of messages ending with "
                                 "the assistant's reply ({'role': 'assistant', 'content': ...})")
            sides[col] = msgs[-1].get("content", "")
        pair = {"prompt": row["prompt"], **sides}
        if "score_chosen" in row and "score_rejected" in row:
            pair["margin"] = float(row["score_chosen"]) - float(row["score_rejected"])
        out.append(pair)
    return validate_pairs(out, "UltraFeedback")


def load_apt_pairs(source) -> list[dict]:
    """The APT pair format: a JSON file (or its parsed dict) ``{"pairs": [{"prompt", "chosen", "rejected"}]}``."""
    return validate_pairs(read_apt_json(source, "pairs", "APT pair"), "APT pairs")


# ---------------------------------------------------------------- instructions and prompts

COIG_FIELDS = ("instruction", "input", "output")


def coig_to_sft(rows) -> list[dict]:
    """COIG-CQIA rows (``instruction``, ``input``, ``output``, ``task_type``, ``domain``, ``metadata``,
    ``answer_from``, ``human_verified``, ``copyright``) to ``{"prompt", "completion"}`` records.

    prompt = instruction, plus a blank line and ``input`` when ``input`` is not empty. Also serves Alpaca-style
    data (the same three fields).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("the instruction dataset has zero rows: check the split/config you loaded")
    out = []
    for i, row in enumerate(rows):
        missing = [f for f in ("instruction", "output") if f not in row]
        if missing:
            raise KeyError(f"row {i} has no column(s) {missing}; an instruction row needs {COIG_FIELDS} "
                           f"(input may be empty); it has {sorted(row)}")
        instruction, extra = str(row["instruction"] or "").strip(), str(row.get("input") or "").strip()
        output = str(row["output"] or "").strip()
        if not instruction or not output:
            col = "instruction" if not instruction else "output"
            raise ValueError(f"row {i}: column {col!r} is empty; fill it in or drop the row")
        out.append({"prompt": f"{instruction}\n\n{extra}" if extra else instruction, "completion": output})
    return out


def load_apt_instructions(source) -> list[dict]:
    """The APT instruction format, a JSON file (or the parsed dict):
    ``{"instructions": [{"instruction": ..., "input": ..., "output": ...}, ...]}`` -> SFT records."""
    return coig_to_sft(read_apt_json(source, "instructions", "APT instruction"))


def gsm8k_to_rows(records: list[dict]) -> list[dict]:
    """GSM8K records (``question``, ``answer`` with its worked solution) -> rows ``{"prompt", "answer",
    "system"}`` whose ``answer`` is the final number and whose system message asks for ``#### <number>``."""
    if not records:
        raise ValueError("no GSM8K records: the dataset has zero rows")
    rows = []
    for i, r in enumerate(records):
        missing = {"question", "answer"} - set(r)
        if missing:
            raise KeyError(f"GSM8K row {i} lacks {sorted(missing)} (it has {sorted(r)}); "
                           "the openai/gsm8k schema is question, answer")
        try:
            final = gsm8k_final_answer(r["answer"])
        except ValueError as e:
            raise ValueError(f"GSM8K row {i}: {e}") from None
        rows.append({"prompt": r["question"].strip(), "answer": final, "system": MATH_SYSTEM})
    return rows


def apt_prompts_to_rows(obj: dict) -> list[dict]:
    """The APT prompts format ``{"prompts": [str | {"prompt", "answer"?, "system"?}, ...]}`` -> rows."""
    if not isinstance(obj, dict) or "prompts" not in obj:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f'the APT prompts format is a JSON object {{"prompts": [...]}}; got {got}')
    items = obj["prompts"]
    if not isinstance(items, list) or not items:
        raise ValueError('"prompts" must be a non-empty list of strings or {"prompt": ...} objects')
    rows = []
    for i, item in enumerate(items):
        row = {"prompt": item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else None
        if row is None or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f'prompts[{i}] must be a non-empty string or an object with a "prompt" string; got {item!r}')
        rows.append(row)
    return rows


def load_prompts(path: str | Path) -> list[dict]:
    """Read prompt rows from a file: JSONL in the GSM8K schema or with a ``prompt`` column, or JSON in the
    APT prompts format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        return apt_prompts_to_rows(json.loads(text))
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path.name} line {n} is not valid JSON ({e}); JSONL needs one object per line") from None
    if not records:
        raise ValueError(f"{path.name} holds no records")
    if {"question", "answer"} <= set(records[0]):
        return gsm8k_to_rows(records)
    if "prompt" in records[0]:
        return apt_prompts_to_rows({"prompts": records})
    raise ValueError(f"{path.name}: rows have columns {sorted(records[0])}; expected the GSM8K schema "
                     "(question, answer) or a 'prompt' column")


# ---------------------------------------------------------------- TRL's formats


def to_trl_preference_dataset(pairs: list[dict], tokenizer=None):
    """Pairs as a ``datasets.Dataset`` in one of TRL's preference formats (DPO, ORPO, RewardTrainer).

    ``tokenizer=None``: *conversational* - ``prompt`` a message list, ``chosen``/``rejected`` one assistant
    message each; TRL applies the tokenizer's chat template itself. With a tokenizer: *explicit prompt*
    strings, the chat template already applied by ``format_prompt`` (TRL appends EOS and tokenises prompt +
    completion, as :func:`apt_course.lm.build_pair_batch` does). Both give the same token ids (tests check).
    """
    from datasets import Dataset

    from .tokenizer import format_prompt, messages_for

    pairs = validate_pairs(pairs)
    if tokenizer is None:
        rows = [{"prompt": p["prompt"] if isinstance(p["prompt"], list) else messages_for(p["prompt"], p.get("system")),
                 "chosen": [{"role": "assistant", "content": str(p["chosen"])}],
                 "rejected": [{"role": "assistant", "content": str(p["rejected"])}]} for p in pairs]
        return Dataset.from_list(rows)
    return Dataset.from_dict({"prompt": [format_prompt(tokenizer, p["prompt"], p.get("system")) for p in pairs],
                              "chosen": [str(p["chosen"]) for p in pairs],
                              "rejected": [str(p["rejected"]) for p in pairs]})


# ---------------------------------------------------------------- per-profile loaders


def _profile(profile):
    from .profiles import get_profile

    return get_profile(profile) if isinstance(profile, str) else profile


def english_world(profile, role: str) -> bool:
    """True for a real model with no dataset for ``role`` (the ``smol`` profile): the chapter runs the tiny
    world's task in English instead (:func:`~apt_course.world.english_sums`), which needs no download."""
    return profile.model is not None and not profile.datasets.get(role)


def dataset_of(profile, role: str) -> str:
    """The Hub id (or local stand-in) a real-model profile names for ``role``, or a clear error."""
    if role not in profile.datasets:
        raise KeyError(f"profile {profile.name!r} names no {role!r} dataset (it has {sorted(profile.datasets) or 'none'}): "
                       f"set APT_COURSE_DATASET_{role.upper()}=<Hub id or local file>, or run this chapter on the "
                       "'tiny' or 'gpu' profile")
    return profile.datasets[role]


def load_sft_data(profile, n_train: int = 4000, n_test: int = 200, seed: int = 0, tasks=world.TASKS,
                  apt_instructions=None) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` instruction records ``{"prompt", "completion" or "answer"}`` for a profile.

    tiny: ``n_train`` tiny-world tasks (train split) and ``n_test`` from the held-out test split. A real-model
    profile: an APT instruction file when ``apt_instructions`` is given, else the profile's ``sft`` dataset
    (COIG-CQIA's ``ruozhiba`` subset); its first 90 % is the train set and up to ``n_test`` rows after it are held out.
    ``smol`` (no ``sft`` dataset): :func:`~apt_course.world.english_sums` asking for the number only.
    """
    profile = _profile(profile)
    if profile.model is None:
        return (world.instruction_examples(n_train, "train", seed=seed, tasks=tasks),
                world.instruction_examples(n_test, "test", seed=seed + 1000, tasks=tasks))
    if apt_instructions:
        records = load_apt_instructions(apt_instructions)
    elif english_world(profile, "sft"):
        return world.english_sums("train", seed=seed)[:n_train], world.english_sums("test", seed=seed + 1000)[:n_test]
    else:
        name = dataset_of(profile, "sft")
        records = coig_to_sft(load_hub_dataset(name, "train", "ruozhiba" if "COIG" in name else None))
    cut = int(0.9 * len(records))
    return records[:cut], records[cut:cut + n_test]


def load_preference_pairs(profile, split: str = "train", n: int = 2000, seed: int = 0) -> list[dict]:
    """Pairs for a profile: the tiny world's (``tiny``), or the first ``n`` rows of the profile's preference
    dataset from the Hub (``gpu``: hh-rlhf, or UltraFeedback when its id mentions it), converted by
    :func:`hh_rlhf_to_pairs` / :func:`ultrafeedback_to_pairs` (prompts with several turns come as chat-message lists);
    ``smol`` (no ``preference`` dataset): :func:`~apt_course.world.english_sum_pairs`, the bare sum over rambling."""
    profile = _profile(profile)
    if profile.model is None:
        return world.preference_pairs(n, split, seed)
    if english_world(profile, "preference"):
        return world.english_sum_pairs(split, seed)[:n]
    name = dataset_of(profile, "preference")
    hf_split = {"train": "train_prefs", "test": "test_prefs"}[split] if "ultrafeedback" in name else split
    rows = load_hub_dataset(name, f"{hf_split}[:{n}]")
    return ultrafeedback_to_pairs(rows) if "ultrafeedback" in name else hh_rlhf_to_pairs(rows)


def load_rlhf_data(profile, n_train: int = 400, n_test: int = 64, seed: int = 0,
                   max_prompt_chars: int = 400) -> dict:
    """Prompts and a ground truth for a profile: ``{"train", "test", "quality"}`` (prompt strings).

    tiny: greeting prompts (train; the held-out test split for ``test``) and ``quality = is_polite``.
    smol (no ``preference`` dataset): English sums asked plainly, ``quality`` = the reply's number is the sum.
    gpu: single-turn Anthropic/hh-rlhf prompts of at most ``max_prompt_chars`` characters (the profile's
    ``preference`` dataset through :func:`hh_rlhf_to_pairs`); there is no ground
    truth there, so ``quality`` is None and the chapter reports the RM score, the KL and the reply length.
    """
    profile = _profile(profile)
    if profile.model is None:
        return {"train": world.greeting_prompts(n_train, "train", seed=seed),
                "test": world.greeting_prompts(n_test, "test", seed=123), "quality": world.is_polite}
    if english_world(profile, "preference"):  # smol: English sums asked plainly; the checker is the ground truth
        train, test = world.english_sums("train", "", seed=seed)[:n_train], world.english_sums("test", "", seed=123)[:n_test]
        answers = {r["prompt"]: r["answer"] for r in train + test}

        def right_sum(prompt: str, reply: str) -> bool:
            """The ground truth the RM only approximates: the reply's (last) number is the sum."""
            return math_correctness_reward(None, [reply], [answers[prompt]])[0] == 1.0

        return {"train": [r["prompt"] for r in train], "test": [r["prompt"] for r in test], "quality": right_sum}

    def prompts(split, n):
        rows = load_hub_dataset(dataset_of(profile, "preference"), f"{split}[:{4 * n}]")
        single = [p["prompt"] for p in hh_rlhf_to_pairs(rows)
                  if isinstance(p["prompt"], str) and len(p["prompt"]) <= max_prompt_chars]
        if not single:
            raise ValueError(f"no single-turn prompt of <= {max_prompt_chars} characters in the first {4 * n} "
                             f"rows of {dataset_of(profile, 'preference')!r} ({split}); raise max_prompt_chars")
        return single[:n]

    return {"train": prompts("train", n_train), "test": prompts("test", n_test), "quality": None}


GRPO_TASKS = ("sums", "gsm8k")  # a real model's chapter 09 task: English sums, or the profile's math dataset


def load_grpo_data(profile, n_train: int = 2000, n_test: int = 200, seed: int = 0, tasks=TINY_GRPO_TASKS,
                   chatty_rate: float = 0.6, task: str | None = None) -> dict:
    """Prompts, reward functions and an answer checker for a profile.

    tiny: tiny-world problems of ``tasks`` (train, and the held-out test split), scored by
    :func:`~apt_course.correctness_reward` (weight 1) and :func:`~apt_course.format_reward`
    (weight 0.1); ``"sft"`` holds :func:`~apt_course.world.chatty_demonstrations` of the train problems, the chapter's
    deliberately sloppy starting point. gpu: GSM8K (the profile's ``math`` dataset) through
    :func:`gsm8k_to_rows`, scored by the numeric checker; ``"sft"`` is None (the real
    model is already instruction-tuned); ``smol`` (no ``math`` dataset): :func:`~apt_course.world.english_sums`, scored
    by the same numeric checker. ``task`` chooses for a real model: ``"sums"`` (English sums, which a 135M model
    can learn from its own samples), ``"gsm8k"`` (the ``math`` dataset, where such a model scores 0-2 %: name a
    larger model for it), or None (``gsm8k`` where the profile names a ``math`` dataset, else ``sums``).
    Returns ``{"train", "test", "sft", "reward_fns", "reward_weights", "checker", "max_new_tokens"}``;
    ``checker(row, completion) -> bool`` grades greedy answers.
    """
    profile = _profile(profile)
    if task is not None and task not in GRPO_TASKS:
        raise ValueError(f"task must be one of {GRPO_TASKS} (or None: the profile's), got {task!r}")
    if profile.model is None:
        train = world.verifiable_problems(n_train, "train", seed=seed, tasks=tasks)
        return {"train": train, "test": world.verifiable_problems(n_test, "test", seed=seed, tasks=tasks),
                "sft": world.chatty_demonstrations(train, chatty_rate, seed),
                "reward_fns": [correctness_reward, format_reward], "reward_weights": [1.0, 0.1],
                "checker": lambda row, c: correctness_reward(None, [c], [row["answer"]])[0] == 1.0,
                "max_new_tokens": world.MAX_LEN}
    if task == "sums" or (task is None and english_world(profile, "math")):  # reward: the reply's last number
        # is the sum (reachable from the start)
        return {"train": world.english_sums("train", seed=seed)[:n_train],
                "test": world.english_sums("test", seed=seed)[:n_test], "sft": None,
                "reward_fns": [math_correctness_reward], "reward_weights": [1.0],
                "checker": lambda row, c: math_correctness_reward(None, [c], [row["answer"]])[0] == 1.0,
                "max_new_tokens": 8}
    train = gsm8k_to_rows(list(load_hub_dataset(dataset_of(profile, "math"), f"train[:{n_train}]", "main")))
    test = gsm8k_to_rows(list(load_hub_dataset(dataset_of(profile, "math"), f"test[:{n_test}]", "main")))
    return {"train": train, "test": test, "sft": None,
            "reward_fns": [math_correctness_reward, math_format_reward], "reward_weights": [1.0, 0.1],
            "checker": lambda row, c: math_correctness_reward(None, [c], [row["answer"]])[0] == 1.0,
            "max_new_tokens": profile.max_new_tokens}


# ---------------------------------------------------------------- reasoning: the unified storm record

def storm_record(problem: str, steps: list[str], answer: str, source: str, step_sep: str = "\n") -> dict:
    """The unified storm format ``{"problem", "cot_explicit", "answer", "source"}``, plus the chain split into
    ``steps`` (and the ``step_sep`` that joins them) for the internalisation curriculum."""
    steps = [s for s in (str(x).strip() for x in steps) if s]
    return {"problem": problem, "cot_explicit": step_sep.join(steps), "answer": answer, "source": source,
            "steps": steps, "step_sep": step_sep}


def validate_storm_records(records, what: str = "storm data") -> list[dict]:
    """Every record needs a non-empty ``problem``, ``answer`` and at least one reasoning step."""
    records = list(records)
    if not records:
        raise ValueError(f"{what} has zero examples: load a non-empty file or split")
    for i, r in enumerate(records):
        for col in ("problem", "answer", "steps"):
            if col not in r:
                raise KeyError(f"{what} example {i} has no {col!r}; it has {sorted(r)}")
        if not str(r["problem"]).strip() or not str(r["answer"]).strip():
            col = "problem" if not str(r["problem"]).strip() else "answer"
            raise ValueError(f"{what} example {i}: {col!r} is empty; fill it in or drop the example")
        if not r["steps"]:
            raise ValueError(f"{what} example {i} has no reasoning steps ('cot' is empty): nothing to internalise")
    return records


def world_to_storm(problems: list[dict]) -> list[dict]:
    """Tiny-world :func:`~apt_course.world.cot_problems` to storm records (steps = the column sums,
    ``explicit_completion`` = the world's ``completion_cot``)."""
    return validate_storm_records(
        [storm_record(p["prompt"], p["cot"].split(";"), p["answer"], "tiny-world", ";") for p in problems],
        "tiny-world problems")


def read_reasoning_examples(source) -> list[dict]:
    """The APT reasoning format, a JSON file (or the parsed dict):
    ``{"reasoning_examples": [{"problem": ..., "cot": ["step", ...], "answer": ...}, ...]}`` -> storm records.

    A missing or empty file, a missing ``cot``/``answer``/``problem``, an empty chain: a clear error naming the
    example. ``cot`` may also be one string (one step per line).
    """
    rows = read_apt_json(source, "reasoning_examples", "APT reasoning")
    if not isinstance(rows, list) or not rows:
        raise ValueError('the APT reasoning file holds no examples: "reasoning_examples" must be a non-empty list '
                         'of {"problem", "cot": [steps], "answer"}')
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"reasoning example {i} is a {type(row).__name__}, expected an object with "
                            "problem/cot/answer")
        missing = [c for c in ("problem", "cot", "answer") if c not in row]
        if missing:
            raise KeyError(f"reasoning example {i} has no {missing} field(s); each example needs 'problem', "
                           f"'cot' (a list of steps) and 'answer'; it has {sorted(row)}")
        cot = row["cot"]
        steps = cot.splitlines() if isinstance(cot, str) else list(cot)
        if not [s for s in steps if str(s).strip()]:
            raise ValueError(f"reasoning example {i}: 'cot' is empty; give at least one reasoning step")
        for col in ("problem", "answer"):
            if not str(row[col]).strip():
                raise ValueError(f"reasoning example {i}: {col!r} is empty; fill it in or drop the example")
        out.append(storm_record(str(row["problem"]).strip(), steps, str(row["answer"]).strip(),
                                str(row.get("source", "apt")), "\n"))
    return out


def load_storm_data(profile, n_train: int = 4000, n_test: int = 150, seed: int = 0, digits: int = 2,
                    reasoning_file=None) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` storm records for a profile.

    tiny: :func:`~apt_course.world.cot_problems` (``digits``-digit sums); the test set is :func:`~apt_course.world.heldout_sums`
    (held out, and so is each problem with its operands swapped). ``smol`` (no ``reasoning`` dataset):
    :func:`~apt_course.world.english_chain_sums`, three ``digits``-digit numbers with their running total as the
    chain, questions split by :func:`~apt_course.world.split_of`. A real-model profile: the APT
    ``reasoning_file`` when given, else the profile's ``reasoning`` dataset (``simplescaling/s1K-1.1`` or
    ``s1K``: a Hub id, or a local file in its schema) through :func:`s1k_to_storm`. Of those, the
    ``n_train + n_test`` examples with the shortest chains are kept (s1K's traces run to tens of thousands of
    tokens; a small GPU trains on the short ones), shuffled by ``seed``, and ``n_test`` of them held out.
    """
    profile = _profile(profile)
    if profile.model is None:
        return (world_to_storm(world.cot_problems(n_train, "train", seed=seed, digits=digits)),
                world_to_storm(world.heldout_sums(n_test, seed=seed + 1000, digits=digits)))
    if reasoning_file is not None:
        records = read_reasoning_examples(reasoning_file)
    elif english_world(profile, "reasoning"):  # smol: three-number English sums, the running total as the chain
        return tuple(validate_storm_records(
            [storm_record(r["prompt"], r["steps"], r["answer"], "english-sums", world.CHAIN_SEP)
             for r in world.english_chain_sums(n, split, seed=seed, digits=digits)], f"smol {split} sums")
            for n, split in ((n_train, "train"), (n_test, "test")))
    else:
        records = s1k_to_storm(load_hub_dataset(dataset_of(profile, "reasoning"), "train"))
    if len(records) < 2:
        raise ValueError(f"{len(records)} reasoning example(s): need at least 2 (one to train on, one held out)")
    records = sorted(records, key=lambda r: len(r["cot_explicit"]) + len(r["answer"]))[:n_train + n_test]
    random.Random(seed).shuffle(records)
    n_held = min(n_test, max(1, len(records) // 10))
    return records[n_held:], records[:n_held]



S1K_COLUMNS = ("solution", "question", "cot_type", "source_type", "metadata", "gemini_thinking_trajectory",
               "gemini_attempt", "deepseek_thinking_trajectory", "deepseek_attempt", "gemini_grade",
               "gemini_grade_reason", "deepseek_grade", "deepseek_grade_reason")
S1K_V1_COLUMNS = ("solution", "question", "cot_type", "source_type", "metadata", "cot", "thinking_trajectories",
                  "attempt")


def split_reasoning(text: str) -> list[str]:
    """A long reasoning trace split into steps: its paragraphs (blank-line separated), else its lines."""
    text = str(text).strip()
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(parts) <= 1:
        parts = [p.strip() for p in text.splitlines() if p.strip()]
    return parts


def s1k_to_storm(rows, trajectory: str = "deepseek", only_graded_correct: bool = False) -> list[dict]:
    """``simplescaling/s1K-1.1`` rows (columns: solution, question, cot_type, source_type, metadata,
    {gemini,deepseek}_thinking_trajectory, {gemini,deepseek}_attempt, {gemini,deepseek}_grade[_reason]) to
    storm records:

    problem = ``question``; cot_explicit = ``<trajectory>_thinking_trajectory`` (steps = its paragraphs);
    answer = ``<trajectory>_attempt`` (the response written after thinking); source =
    ``s1K-1.1/<source_type>``. ``only_graded_correct`` keeps rows whose ``<trajectory>_grade`` is "Yes".
    Rows of the original ``simplescaling/s1K`` (``thinking_trajectories`` list, ``attempt``) are read too.
    """
    if trajectory not in ("deepseek", "gemini"):
        raise ValueError(f"trajectory must be 'deepseek' or 'gemini' (s1K-1.1 holds both), got {trajectory!r}")
    rows = list(rows)
    if not rows:
        raise ValueError("the s1K dataset has zero rows: check the split you loaded")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"s1K row {i} is a {type(row).__name__}, expected a dict of columns")
        if "thinking_trajectories" in row:  # simplescaling/s1K (v1.0)
            cot_col, ans_col, grade_col, version = "thinking_trajectories", "attempt", None, "s1K"
        else:
            cot_col, ans_col = f"{trajectory}_thinking_trajectory", f"{trajectory}_attempt"
            grade_col, version = f"{trajectory}_grade", "s1K-1.1"
        missing = [c for c in ("question", cot_col, ans_col) if c not in row]
        if missing:
            raise KeyError(f"s1K row {i} has no column(s) {missing}; s1K-1.1 rows have {list(S1K_COLUMNS)} "
                           f"(s1K v1.0: {list(S1K_V1_COLUMNS)}); this row has {sorted(row)}")
        if only_graded_correct and grade_col and str(row.get(grade_col, "")).strip().lower() != "yes":
            continue
        cot = row[cot_col]
        cot = "\n\n".join(cot) if isinstance(cot, list) else cot
        for col, value in (("question", row["question"]), (cot_col, cot), (ans_col, row[ans_col])):
            if value is None or not str(value).strip():
                raise ValueError(f"s1K row {i}: column {col!r} is empty; drop the row or pick the other trajectory")
        out.append(storm_record(str(row["question"]).strip(), split_reasoning(cot), str(row[ans_col]).strip(),
                                f"{version}/{row.get('source_type', 'unknown')}", "\n\n"))
    if not out:
        raise ValueError(f"no s1K row is graded correct for {trajectory!r}: set only_graded_correct=False")
    return out


def final_answer(text: str) -> str:
    """A write-up's final answer: the content of its last ``\\boxed{...}`` (nested braces kept), else its last
    non-empty line; the text after any ``</think>``, with ``$`` signs, outer spaces and a final period removed.
    (``"so ... $\\boxed{\\frac{1}{2}}$."`` -> ``"\\frac{1}{2}"``; ``"It boils at 100 C."`` -> ``"It boils at 100 C"``.)"""
    text = str(text).split("</think>")[-1]
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j].strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].replace("$", "").strip().rstrip(".").strip() if lines else ""


def answer_match(completion: str, answer: str) -> tuple[bool, bool]:
    """``(strict, lenient)`` grading of ``completion`` against a reference ``answer`` (a final answer or a write-up):
    strict = their :func:`final_answer` strings are equal (spaces aside); lenient = their last numbers are equal
    (``72`` == ``72.0``), or strict when the answer has no number."""
    from .rewards import _NUMBER, numbers_equal

    def norm(s):
        return re.sub(r"\s+", "", final_answer(s))

    strict = norm(completion) == norm(answer) != ""
    want = _NUMBER.findall(final_answer(answer)) or _NUMBER.findall(str(answer))
    if not want:
        return strict, strict
    got = _NUMBER.findall(str(completion).split("</think>")[-1])
    return strict, strict or bool(got) and numbers_equal(got[-1].replace(",", ""), want[-1].replace(",", ""))


# ---------------------------------------------------------------- red-team data (chapter 10)
# (Anthropic/hh-rlhf "red-team-attempts" and "harmless-base", HuggingFaceH4/cai-conversation-harmless)

RED_TEAM_FIELDS = ("transcript", "min_harmlessness_score_transcript", "num_params", "model_type", "rating",
                   "task_description", "task_descrip_harmlessness_score", "red_team_member_id", "is_upworker", "tags")
CAI_HARMLESS_FIELDS = ("init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt",
                       "revision_response", "prompt", "messages", "chosen", "rejected")
RED_TEAM_DATASET = ("Anthropic/hh-rlhf", "red-team-attempts")
HARMLESS_DATASET = ("Anthropic/hh-rlhf", "harmless-base")
HELPFUL_DATASET = ("Anthropic/hh-rlhf", "helpful-base")
CAI_DATASET = "HuggingFaceH4/cai-conversation-harmless"


def _first_human_turn(transcript: str, where: str) -> str:
    if not isinstance(transcript, str) or not transcript.lstrip("\n").startswith("Human:"):
        raise ValueError(f"{where}: a transcript should start with '\\n\\nHuman:', it starts with "
                         f"{str(transcript)[:20]!r}")
    parts = re.split(r"\n\n(?:Human|Assistant):", "\n\n" + transcript.lstrip("\n"))
    text = parts[1].strip() if len(parts) > 1 else ""
    if not text:
        raise ValueError(f"{where}: the first Human turn is empty")
    return text


def _rows(rows, what: str) -> list[dict]:
    rows = list(rows)
    if not rows:
        raise ValueError(f"the {what} data has zero rows: check the split or slice you loaded")
    return rows


def red_team_attempts_to_prompts(rows) -> list[dict]:
    """hh-rlhf ``red-team-attempts`` rows -> red-team prompts ``{"prompt"}`` (the red-teamer's first turn), with
    ``task_description``, ``tags``, ``rating`` (0-4, how far the attack got) and ``harmlessness``
    (``min_harmlessness_score_transcript``) kept; ``principle`` is None (no label says which principle)."""
    out = []
    for i, row in enumerate(_rows(rows, "red-team-attempts")):
        if "transcript" not in row:
            raise KeyError(f"red-team-attempts row {i} has no 'transcript' column; it has {sorted(row)} "
                           f"(the dataset's columns are {RED_TEAM_FIELDS})")
        out.append({"prompt": _first_human_turn(row["transcript"], f"red-team-attempts row {i}"),
                    "task_description": row.get("task_description") or "", "tags": list(row.get("tags") or []),
                    "rating": row.get("rating"), "harmlessness": row.get("min_harmlessness_score_transcript"),
                    "family": "red_team", "principle": None})
    return out


def hh_prompts(rows, family: str = "red_team") -> list[dict]:
    """hh-rlhf ``harmless-base`` (red-team-like) or ``helpful-base`` (benign) rows -> prompts: the conversation
    before the last Assistant turn (text for one turn, chat messages for more), via the hh-rlhf converter."""
    principle = "helpful" if family == "benign" else None
    return [{"prompt": p["prompt"], "family": family, "principle": principle}
            for p in hh_rlhf_to_pairs(_rows(rows, "hh-rlhf"))]


def cai_harmless_to_traces(rows) -> list[dict]:
    """``HuggingFaceH4/cai-conversation-harmless`` rows -> SL-CAI traces: ``prompt`` (init_prompt),
    ``response``, ``critique_request``, ``critique``, ``revision_request``, ``revision`` (Mistral's own
    critique and revision of its answer: what :func:`critique_and_revise` produces)."""
    keys = {"prompt": "init_prompt", "response": "init_response", "critique_request": "critic_prompt",
            "critique": "critic_response", "revision_request": "revision_prompt", "revision": "revision_response"}
    out = []
    for i, row in enumerate(_rows(rows, "cai-conversation-harmless")):
        missing = [v for v in keys.values() if v not in row]
        if missing:
            raise KeyError(f"cai-conversation-harmless row {i} is missing {missing}; it has {sorted(row)}")
        rec = {k: str(row[v] or "").strip() for k, v in keys.items()}
        if not rec["prompt"] or not rec["revision"]:
            raise ValueError(f"cai-conversation-harmless row {i}: empty init_prompt or revision_response")
        out.append(rec)
    return out


def cai_harmless_to_pairs(rows) -> list[dict]:
    """``cai-conversation-harmless`` rows -> preference pairs: ``prompt``, ``chosen`` (the revision) and
    ``rejected`` (the initial answer), the last assistant message of the ``chosen``/``rejected`` message lists."""
    out = []
    for i, row in enumerate(_rows(rows, "cai-conversation-harmless")):
        for col in ("prompt", "chosen", "rejected"):
            if col not in row:
                raise KeyError(f"cai-conversation-harmless row {i} has no {col!r} column; it has {sorted(row)}")
        sides = {}
        for col in ("chosen", "rejected"):
            msgs = row[col]
            if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
                raise ValueError(f"cai-conversation-harmless row {i}: {col!r} must be a list of messages ending "
                                 "with the assistant's reply")
            sides[col] = msgs[-1]["content"]
        out.append({"prompt": row["prompt"], **sides})
    return validate_pairs(out, "cai-conversation-harmless")


def cai_harmless_to_prompts(rows) -> list[dict]:
    """``cai-conversation-harmless`` rows -> red-team prompts (its ``prompt`` column, else ``init_prompt``)."""
    out = []
    for i, row in enumerate(_rows(rows, "cai-conversation-harmless")):
        text = row.get("prompt") or row.get("init_prompt")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"cai-conversation-harmless row {i} has no 'prompt' (or 'init_prompt') text")
        out.append({"prompt": text.strip(), "family": "red_team", "principle": None})
    return out
