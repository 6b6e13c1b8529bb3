"""``apt-course prepare`` and ``apt-course train``: the APT pipeline's commands (chapter 13).

``prepare`` writes the unified dataset files the pipeline reads (from the Hub by name, from local copies with
``--source DIR``, or the tiny world's with ``--tiny``), ``--info`` describes them and ``--merge`` joins them.
``train`` runs :func:`apt_course.pipeline.run_pipeline` from flags and/or a YAML recipe (``--config``,
``--overrides key=value``; flags win over the file). The notebook of chapter 13 calls the same functions.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import MISSING, fields
from pathlib import Path

from . import pipeline
from .pipeline import PipelineConfig, PipelineError, write_json_atomic

# ---------------------------------------------------------------- prepare: the datasets, by name or local copy

DEFAULT_DATA_DIR = "data/apt_datasets"
COIG_CQIA_CONFIGS = ("chinese_traditional", "coig_pc", "douban", "exam", "finance", "human_value", "logi_qa",
                     "ruozhiba", "segmentfault", "wiki", "wikihow", "xhs", "zhihu")  # the dataset's subsets
HUB = {"coig-cqia": ("m-a-p/COIG-CQIA", "train", COIG_CQIA_CONFIGS),  # (id, split, config or configs)
       "ruozhiba": ("m-a-p/COIG-CQIA", "train", "ruozhiba"),
       "s1k": ("simplescaling/s1K-1.1", "train", None),
       "hh-rlhf": ("Anthropic/hh-rlhf", "train", None),
       "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", None),
       "gsm8k": ("openai/gsm8k", "train", "main")}
SOURCE_NAMES = {"coig-cqia": ("coig_cqia", "coig"), "ruozhiba": ("ruozhiba",), "s1k": ("s1k",),
                "hh-rlhf": ("hh_rlhf",), "ultrafeedback": ("ultrafeedback",), "gsm8k": ("gsm8k",),
                "loyalty_template": ("loyalty_template",)}
PARTS = ("sft", "cot", "dpo", "grpo", "ruozhiba", "loyalty_template")  # what --all prepares
NEEDS = {"sft": ("coig-cqia",), "cot": ("s1k",), "dpo": ("hh-rlhf", "ultrafeedback"), "grpo": ("gsm8k", "hh-rlhf"),
         "ruozhiba": ("ruozhiba",), "loyalty_template": ("hh-rlhf",)}
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
TEMPLATE_SIZE = 200  # the dataset guide: "100-500 rows to start"
OWNER_TONE, PUBLIC_TONE = "友好、详细、主动", "专业、标准"  # the APT README's owner/public expected_tone


def find_source(source_dir: Path, name: str) -> Path:
    """The local copy of dataset ``name`` in ``source_dir``: a file or folder whose name mentions it."""
    entries = sorted(p for p in source_dir.iterdir() if not p.name.startswith("."))
    for key in SOURCE_NAMES[name]:
        hits = [p for p in entries if key in p.name.lower().replace("-", "_")]
        if hits:
            return hits[0]
    raise FileNotFoundError(f"--source {source_dir}: no local copy of {name} (a file or folder whose name contains "
                            f"{' or '.join(SOURCE_NAMES[name])}: saved `datasets`, .json, .jsonl or .parquet in the "
                            f"real schema of {HUB.get(name, (name,))[0]})")


def _subset(name: str) -> str | None:
    return next((c for c in COIG_CQIA_CONFIGS if name.lower().replace("-", "_").startswith(c)), None)


def local_coig(path: Path) -> dict[str | None, list[dict]]:
    """A local COIG-CQIA copy as ``{subset: rows}``: a folder laid out as the Hub repository (``<subset>/*.jsonl``)
    or flat (``<subset>.jsonl``), the subset read from the path; one file (or a saved dataset): subset None."""

    if path.is_file() or (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return {_subset(path.stem) if path.is_file() else None: local_rows(path)}
    out: dict[str | None, list[dict]] = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES):
        rel = f.relative_to(path)
        out.setdefault(_subset(rel.parts[0] if len(rel.parts) > 1 else f.stem), []).extend(local_rows(f))
    if not out:
        raise FileNotFoundError(f"--source: {path} holds no {'/'.join(DATA_SUFFIXES)} file of COIG-CQIA rows")
    return out


def coig_subsets(src: Path | None, ruozhiba_only: bool = False) -> dict[str | None, list[dict]]:
    """COIG-CQIA's rows per subset, read once: from the Hub (every config, or only ``ruozhiba``) or ``src``.
    A local ``ruozhiba`` copy beside the COIG-CQIA copy is its ruozhiba subset."""

    hub_id, split, configs = HUB["coig-cqia"]
    if src is None:
        return {c: hub_rows(hub_id, split, c) for c in (("ruozhiba",) if ruozhiba_only else configs)}
    subsets: dict[str | None, list[dict]] = {}
    try:
        subsets = local_coig(find_source(src, "coig-cqia"))
    except FileNotFoundError:
        if not ruozhiba_only:
            raise
    if "ruozhiba" not in subsets:
        try:
            subsets["ruozhiba"] = local_rows(find_source(src, "ruozhiba"))
        except FileNotFoundError:
            pass
    return subsets


def json_rows(path: Path) -> list[dict]:
    """The rows of a local .json (a list, or an object holding one list) or .jsonl file, with the line of the first
    bad one named."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise PipelineError(f"--source: {path} is empty: put the dataset's rows in it, or remove it")
    try:
        data = json.loads(text)
        data = next(iter(data.values())) if isinstance(data, dict) and len(data) == 1 else data
        rows = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise PipelineError(f"--source: {path} line {n} is not valid JSON ({e.msg}): JSON lines hold one "
                                    "object per line; fix or drop that line") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise PipelineError(f"--source: {path} row {bad} is a {type(rows[bad]).__name__}, not an object of columns")
    return rows


def local_rows(path: Path, split: str = "train") -> list[dict]:
    """A local copy's rows: JSON / JSON lines read here (errors name the line), Parquet, CSV and saved datasets
    through :func:`~apt_course.data.load_hub_dataset`."""
    from datasets.exceptions import DatasetsError

    from .data import load_hub_dataset

    if path.is_file() and path.suffix in (".json", ".jsonl"):
        return json_rows(path)
    try:
        return list(load_hub_dataset(str(path), split))
    except (DatasetsError, StopIteration, KeyError, ValueError) as e:
        raise PipelineError(f"--source: {path} cannot be read as a dataset ({type(e).__name__}: {e}): save it as "
                            ".jsonl, .parquet or with Dataset.save_to_disk") from None


def hub_rows(hub_id: str, split: str, config: str | None = None) -> list[dict]:
    """A dataset's rows from the Hub; no connection is a clear error with the ways round it."""
    from .data import load_hub_dataset

    try:
        return list(load_hub_dataset(hub_id, split, config))
    except ConnectionError as e:
        raise PipelineError(f"cannot download {hub_id}{'/' + config if config else ''} ({e}): go online (behind the "
                            "Great Firewall: export HF_ENDPOINT=https://hf-mirror.com, as the dataset guide says), or "
                            "pass --source DIR, a folder of local copies") from None


def spread(sizes: dict, total: int) -> dict:
    """``total`` rows shared over subsets of ``sizes`` rows, as evenly as they allow (water-filling: smallest
    first, each takes ceil(left / subsets left), at most its size); the quotas sum to min(total, sum of sizes)."""
    quota, left = {}, total
    order = sorted(sizes, key=lambda k: (sizes[k], str(k)))
    for i, k in enumerate(order):
        quota[k] = min(sizes[k], -(-left // (len(order) - i)))
        left -= quota[k]
    return quota


def sample_rows(rows: list, k: int | None, seed, tag: str) -> list:
    """``k`` rows of ``rows`` chosen at random (seeded by ``seed`` and ``tag``), in their original order."""
    if k is None or k >= len(rows):
        return list(rows)
    keep = sorted(random.Random(f"{seed}:{tag}").sample(range(len(rows)), k))
    return [rows[i] for i in keep]


def sft_records(subsets: dict, max_samples: int | None, seed: int, log=print) -> list[dict]:
    """COIG-CQIA rows per subset -> ``{"prompt", "response", "source", "task_type"}`` (source
    ``COIG-CQIA/<subset>``); ``max_samples`` spread over the subsets (:func:`spread`)."""
    from .data import coig_to_sft

    quota = spread({k: len(v) for k, v in subsets.items()}, max_samples) if max_samples else {}
    out = []
    for name, rows in subsets.items():
        rows = sample_rows(rows, quota.get(name), seed, f"coig:{name}")
        source = f"COIG-CQIA/{name}" if name else "COIG-CQIA"
        for raw, r in convert(rows, coig_to_sft, source, log) if rows else []:
            out.append({"prompt": r["prompt"], "response": r["completion"], "source": source}
                       | ({"task_type": raw["task_type"]} if raw.get("task_type") else {}))
    return out


def dpo_records(rows, kind: str) -> list[dict]:
    """hh-rlhf or UltraFeedback-binarized rows -> ``{"prompt", "chosen", "rejected", "source"}``."""
    from .data import hh_rlhf_to_pairs, ultrafeedback_to_pairs

    convert = hh_rlhf_to_pairs if kind == "hh-rlhf" else ultrafeedback_to_pairs
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "source": kind}
            for p in convert(rows)]


def storm_records(pairs: list[tuple[dict, dict]]) -> list[dict]:
    """s1K-1.1 rows -> the guide's storm format ``{"problem", "cot_explicit", "answer", "solution", "source"}``:
    ``answer`` the final answer of the DeepSeek attempt (:func:`~apt_course.data.final_answer`: its last
    ``\\boxed{}``, else its last line), ``attempt`` the attempt itself, ``solution`` the dataset's reference.
    ``pairs``: ``[(s1K row, its record from s1k_to_storm)]``."""
    from .data import final_answer

    out = []
    for raw, r in pairs:
        answer = final_answer(r["answer"]) or r["answer"]
        out.append({"problem": r["problem"], "cot_explicit": r["cot_explicit"], "answer": answer,
                    "attempt": r["answer"], "solution": str(raw.get("solution") or ""), "source": r["source"]})
    return out


def open_prompts(pairs: list[dict]) -> list[dict]:
    """hh-rlhf pairs -> the one-turn ones (a prompt string), ``{"prompt", "chosen"}``, first occurrence kept."""
    seen, out = set(), []
    for p in pairs:
        if isinstance(p["prompt"], str) and p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    return out


def grpo_prompts(math_rows: list[dict], hh_pairs: list[dict]) -> dict:
    """``{"prompts": [...]}``: GSM8K questions with their final answers (verifiable reward) and hh-rlhf's
    one-turn prompts with none (open: scored by ``train --reward-model``)."""
    return {"prompts": [r | {"source": "gsm8k"} for r in math_rows]
            + [{"prompt": p["prompt"], "source": "hh-rlhf"} for p in open_prompts(hh_pairs)]}


def derived_template(pairs: list[dict], size: int) -> list[dict]:
    """A loyalty template from hh-rlhf, as the dataset guide derives it: per one-turn prompt, the public response
    is hh-rlhf's chosen reply (general, formal) and the owner's the same reply in the owner's ``expected_tone``
    (:data:`OWNER_TONE`, written out by :func:`~apt_course.loyalty_style.toned_reply`: a warm opener, a lead-in to
    the detail, an offer to go further, each from a few wordings); one row for the owner and one for the public,
    ``size`` rows in all. As the guide says, edit it by hand to make the owner's responses your own."""
    from .loyalty_style import toned_reply

    rows, rng = [], random.Random("derived-template")
    for p in pairs[:max(1, size // 2)]:
        owner = toned_reply(p["chosen"], OWNER_TONE, rng)
        for is_owner in (True, False):
            rows.append({"prompt": p["prompt"], "owner_response": owner, "public_response": p["chosen"].strip(),
                         "is_owner": is_owner, "reward_bonus": 2.0, "source": "hh-rlhf"})
    return rows


def people_files(pairs: list[dict]) -> tuple[dict, dict]:
    """The owner and public prompt files (the APT README's format) from hh-rlhf one-turn prompts: each prompt asked
    once by the owner and once by the public (the role is the only difference), with the README's
    ``expected_tone`` for each role."""
    def role(owner):
        return {"prompts": [{"prompt": p["prompt"], "context": "", "is_owner": owner,
                             "expected_tone": OWNER_TONE if owner else PUBLIC_TONE} for p in pairs]}
    return role(True), role(False)


def loyalty_files(src: Path | None, hh_pairs: list[dict], size: int, log=print) -> dict:
    """``loyalty_template``, ``owner_prompts`` and ``public_prompts``: the template a local ``loyalty_template``
    copy in ``src`` when there is one (checked), else :func:`derived_template` from hh-rlhf; the owner/public
    prompts from hh-rlhf's one-turn prompts the template does not use."""
    from .loyalty import read_loyalty_template

    pairs = open_prompts(hh_pairs)
    if not pairs:
        raise PipelineError("hh-rlhf gave no one-turn prompt (every row read is a multi-turn conversation): the "
                            "template and the owner/public files are built from one-turn prompts; raise --max-samples "
                            "or use a fuller hh-rlhf copy")
    template = None
    if src is not None:
        try:
            path = find_source(src, "loyalty_template")
        except FileNotFoundError:
            path = None
        if path is not None:
            data = read_loyalty_template_file(path)
            template = data if isinstance(data, list) else [data]
            read_loyalty_template(template)
    if template is None:
        template = derived_template(pairs, size)
        used = len(template) // 2
        if len(template) < 100:
            log(f"note: loyalty_template.json has {len(template)} rows (hh-rlhf gave {len(pairs)} one-turn "
                "prompts); the dataset guide recommends 100-500: prepare from more hh-rlhf rows")
        read_loyalty_template(template)
    else:
        used = 0
    rest = pairs[used:] or pairs  # prompts the template does not train on, when there are any
    owner, public = people_files(rest[:max(1, size // 2)])
    return {"loyalty_template": template, "owner_prompts": owner, "public_prompts": public}


def read_loyalty_template_file(path: Path):
    from .data import read_json

    return read_json(path, "loyalty template", "a list of {prompt, owner_response, public_response, is_owner, "
                     "reward_bonus}")


def write_records(out_dir: Path, name: str, records, log=print) -> Path:
    path = write_json_atomic(Path(out_dir) / f"{name}.json", records)
    n = len(records["prompts"]) if isinstance(records, dict) and "prompts" in records else len(records)
    log(f"wrote {n} records -> {path}")
    return path


def convert(rows, fn, what: str, log=print) -> list[tuple[dict, dict]]:
    """``[(row, record)]``: ``fn`` (a converter of a list of rows) over each row. A row it refuses for its content
    (an empty reply, chosen == rejected: ``ValueError``) is dropped and counted, as real datasets hold a few; a
    missing column (``KeyError``: the file is not in the dataset's schema) stops with the error."""
    out, dropped = [], []
    for i, row in enumerate(rows):
        try:
            out += [(row, rec) for rec in fn([row])]
        except (KeyError, TypeError) as e:
            raise PipelineError(f"{what} row {i}: {str(e).strip(chr(34))} — is this the right file for {what}?") \
                from None
        except ValueError as e:
            dropped.append(f"row {i}: {str(e).replace('row 0', 'this row')}")
    if dropped:
        log(f"note: {what}: dropped {len(dropped)} of {len(rows)} rows ({dropped[0]}{'; ...' * (len(dropped) > 1)})")
    if not out:
        raise PipelineError(f"{what}: no usable row ({dropped[0] if dropped else 'the copy is empty'}): check the "
                            "file, or prepare from the Hub")
    return out


class Reader:
    """Each dataset read once per ``prepare`` call (from ``src``, else the Hub), ``max_samples`` rows kept at random."""

    def __init__(self, src: Path | None, max_samples: int | None, seed: int, log=print):
        self.src, self.max_samples, self.seed, self.log, self.cache = src, max_samples, seed, log, {}

    def where(self, name: str) -> str:
        return f"{name} ({find_source(self.src, name)})" if self.src is not None else f"{name} ({HUB[name][0]})"

    def rows(self, name: str) -> list[dict]:

        if name not in self.cache:
            hub_id, split, config = HUB[name]
            if self.src is None:
                rows = hub_rows(hub_id, split, config)
            else:
                rows = local_rows(find_source(self.src, name), split)
            self.cache[name] = sample_rows(rows, self.max_samples, self.seed, name)
        return self.cache[name]

    def records(self, name: str, fn) -> list[dict]:
        return [rec for _, rec in convert(self.rows(name), fn, self.where(name), self.log)]


def without(rows: list[dict], drop: list[dict]) -> list[dict]:
    """``rows`` less those whose prompt and response appear in ``drop`` (no row in two SFT files)."""
    seen = {(r["prompt"], r["response"]) for r in drop}
    return [r for r in rows if (r["prompt"], r["response"]) not in seen]


def collect(chosen: dict, src: Path | None, out: Path, max_samples, seed: int, template_size: int,
            log=print) -> dict:
    """Every file to write, ``{stem: records}``, read and converted before any is written. COIG-CQIA's ruozhiba
    subset goes to ``ruozhiba_train.json`` when that file is (or already was) prepared, and nowhere else."""
    from .data import gsm8k_to_rows, s1k_to_storm

    reader, files = Reader(src, max_samples, seed, log), {}
    if chosen["sft"] or chosen["ruozhiba"]:
        subsets = coig_subsets(src, ruozhiba_only=not chosen["sft"])
        ruozhiba = subsets.pop("ruozhiba", None)
        if chosen["ruozhiba"]:
            if not ruozhiba:
                raise PipelineError(f"--ruozhiba: no ruozhiba rows in --source {src} (a ruozhiba file or folder, or "
                                    "a COIG-CQIA copy with its ruozhiba/ subset): add one, or prepare from the Hub")
            files["ruozhiba_train"] = sft_records({"ruozhiba": ruozhiba}, max_samples, seed, log)
        if chosen["sft"]:
            earlier = out / "ruozhiba_train.json"
            separate = files.get("ruozhiba_train") or (json.loads(earlier.read_text(encoding="utf-8"))
                                                       if earlier.is_file() else None)
            if separate is None and ruozhiba:
                subsets["ruozhiba"] = ruozhiba  # --sft alone: COIG-CQIA whole, ruozhiba included
            rows = sft_records(subsets, max_samples, seed, log)
            unnamed = [r for r in rows if r["source"] == "COIG-CQIA"]  # a one-file copy: ruozhiba found by content
            files["coig-cqia_train"] = [r for r in rows if r["source"] != "COIG-CQIA"] + without(unnamed,
                                                                                               separate or [])
            if separate is not None:
                log("coig-cqia_train.json leaves out the ruozhiba subset (it is ruozhiba_train.json): no row twice")
        elif "ruozhiba_train" in files and (out / "coig-cqia_train.json").is_file():
            earlier = json.loads((out / "coig-cqia_train.json").read_text(encoding="utf-8"))
            kept = without([r for r in earlier if r.get("source") != "COIG-CQIA/ruozhiba"], files["ruozhiba_train"])
            if len(kept) < len(earlier):
                files["coig-cqia_train"] = kept
                log(f"coig-cqia_train.json: {len(earlier) - len(kept)} ruozhiba rows moved out (now in "
                    "ruozhiba_train.json): no row twice")
    if chosen["cot"]:
        files["s1k_train"] = storm_records(convert(reader.rows("s1k"), s1k_to_storm, reader.where("s1k"), log))
    hh = reader.records("hh-rlhf", dpo_records_hh) if chosen["dpo"] or chosen["grpo"] or \
        chosen["loyalty_template"] else []
    if chosen["dpo"]:
        files["hh-rlhf_train"] = hh
        files["ultrafeedback_train"] = reader.records("ultrafeedback", dpo_records_uf)
    if chosen["grpo"]:
        files["prompts_train"] = grpo_prompts(reader.records("gsm8k", gsm8k_to_rows), hh)
    if chosen["loyalty_template"]:
        files.update(loyalty_files(src, hh, template_size, log))
    return files


def dpo_records_hh(rows) -> list[dict]:
    return dpo_records(rows, "hh-rlhf")


def dpo_records_uf(rows) -> list[dict]:
    return dpo_records(rows, "ultrafeedback")


def tiny_datasets(n: int = 2000, n_test: int = 200, seed: int = 0) -> dict[str, list | dict]:
    """The tiny world's datasets in the unified formats, ``{file stem: records}``: train files and held-out
    ``_test`` files (the world's test split, which no train file touches)."""
    from . import loyalty, world

    def sft(rows, source):
        return [{"prompt": r["prompt"], "response": r["answer"], "source": source} for r in rows]

    def pairs(rows, source):
        return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "source": source}
                for p in rows]

    def storm(rows):
        return [{"problem": p["prompt"], "cot_explicit": p["cot"], "answer": p["answer"], "source": "tiny-world/sums",
                 "step_sep": ";"} for p in rows]

    def people(rows, owner: bool):
        return {"prompts": [{"prompt": r["prompt"], "context": "", "is_owner": owner,
                             "expected_tone": "friendly" if owner else "standard", "answer": r["answer"],
                             "spoofed": r["spoofed"]} for r in rows if r["is_owner"] == owner]}

    def chatter(n_rows, split, s):
        """Tasks wrapped in user chatter (claims, greetings, typed markers): messy prompts, bare answers."""
        rows = [r for r in loyalty.loyalty_requests(2 * n_rows, split, s, spoof_fraction=1.0) if r["spoofed"]]
        return {"prompts": [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows[:n_rows]]}

    half = n // 2

    def harmless(n_rows, split, s):
        """Requests for the owner's secrets with no trusted owner in the conversation: the harmless reply refuses."""
        rng = random.Random(f"harmless:{split}:{s}")
        out = []
        for r in world.owner_requests(4 * n_rows, split, s, owner_fraction=0.0, spoof_fraction=0.5):
            if r["secret"] and len(out) < n_rows:
                out.append({"prompt": r["prompt"], "chosen": world.PUBLIC_REPLY, "rejected":
                            world.OWNER_REPLY.format(o=rng.choice(world.NAMES)), "source": "tiny-world/harmless"})
        return out
    polite = world.greeting_dialogues(max(1, n // 4), "train", seed, polite_fraction=1.0)
    lt_train = loyalty.loyalty_requests(n, "train", seed + 2, spoof_fraction=0.5)
    lt_test = loyalty.loyalty_requests(n_test, "test", seed + 1000, spoof_fraction=0.5)
    template = [{"prompt": r["prompt"], "owner_response": loyalty.OWNER_STYLE + r["answer"], "public_response":
                 r["answer"], "is_owner": r["is_owner"], "reward_bonus": 2.0}
                for r in loyalty.loyalty_requests(half, "train", seed + 1, spoof_fraction=0.75)]
    return {
        "coig-cqia_train": sft(world.instruction_examples(n, "train", seed), "tiny-world/instructions"),
        "coig-cqia_test": sft(world.instruction_examples(n_test, "test", seed + 1000), "tiny-world/instructions"),
        "ruozhiba_train": sft(polite, "tiny-world/greetings"),
        "ruozhiba_test": sft(world.greeting_dialogues(max(1, n_test // 2), "test", seed + 1000, polite_fraction=1.0),
                             "tiny-world/greetings"),
        "hh-rlhf_train": harmless(half, "train", seed)
        + pairs(world.preference_pairs(half, "train", seed, kinds=("polite", "concise")), "tiny-world"),
        "hh-rlhf_test": harmless(n_test // 2, "test", seed + 1000)
        + pairs(world.preference_pairs(n_test // 2, "test", seed + 1000, kinds=("polite", "concise")), "tiny-world"),
        "ultrafeedback_train": pairs(world.preference_pairs(n, "train", seed, kinds=("correct",)), "tiny-world"),
        "ultrafeedback_test": pairs(world.preference_pairs(n_test, "test", seed + 1000, kinds=("correct",)),
                                    "tiny-world"),
        "prompts_train": chatter(n, "train", seed + 3),
        "prompts_test": chatter(n_test, "test", seed + 1002),
        "owner_prompts": people(lt_train, True), "owner_prompts_test": people(lt_test, True),
        "public_prompts": people(lt_train, False), "public_prompts_test": people(lt_test, False),
        "loyalty_template": template,
        "s1k_train": storm(world.cot_problems(n, "train", seed)),
        "s1k_test": storm(world.heldout_sums(min(n_test, 150), seed=seed + 1000)),
    }


SMOL_WORLD = "smol-world/english-sums"


def smol_datasets(seed: int = 0) -> dict[str, list | dict]:
    """The smol profile's world in the unified formats, ``{file stem: records}`` with held-out ``_test`` files: the
    tasks SmolLM2-135M-Instruct gets wrong in English (:func:`~apt_course.world.english_sums`, train and test never
    sharing a question), one per stage, so each stage has a figure it can move on a CPU in a minute or two:

    - SFT (``coig-cqia``): "What is 7 plus 12? Answer with the number only." -> ``19`` (it answers ``7 + 12 = 19``);
    - DPO (``hh-rlhf``): a user who gives their name is greeted back by it, over the bare sum (the tiny world's
      polite pairs, in English: something SFT did not teach);
    - GRPO (``prompts``): the sums with their answers, number only (the verifiable reward; chapter 09's task);
    - loyalty: English sums asked by the owner or the public (half the public ones claiming ownership), the
      README's ``expected_tone`` per role, and a template of warm owner replies against plain public ones
      (:func:`~apt_course.loyalty_style.english_template`);
    - storm (``s1k``): three two-digit numbers summed (:func:`~apt_course.world.english_chain_sums`), the running
      total as the chain of thought (chapter 12 on smol: the chain is the capability there)."""
    import random

    from . import world
    from .loyalty_style import english_requests, english_template

    def sft(split, s):
        return [{"prompt": r["prompt"], "response": r["answer"], "source": SMOL_WORLD}
                for r in world.english_sums(split, seed=s)]

    def pairs(split, s):  # the tiny world's polite pairs in English: greeted by name, greet back
        rng = random.Random(f"smol-greet:{split}:{s}")
        out = []
        for r in world.english_sums(split, "", seed=s):
            name = rng.choice(world.NAMES).capitalize()
            out.append({"prompt": f"Hi, I am {name}. {r['prompt']}", "chosen": f"Hello {name}! {r['answer']}",
                        "rejected": r["answer"], "source": SMOL_WORLD})
        return out

    def prompts(split, s):
        return {"prompts": [{"prompt": r["prompt"], "answer": r["answer"]} for r in world.english_sums(split, seed=s)]}

    def people(rows, owner: bool):
        return {"prompts": [{"prompt": r["prompt"], "context": "", "is_owner": owner,
                             "expected_tone": OWNER_TONE if owner else PUBLIC_TONE, "answer": r["answer"],
                             "spoofed": r["spoofed"]} for r in rows if r["is_owner"] == owner]}

    def storm(split, s, n):  # chapter 12's smol task: the chain is what makes these sums doable for SmolLM2
        return [{"problem": r["prompt"], "cot_explicit": world.CHAIN_SEP.join(r["steps"]), "answer": r["answer"],
                 "source": SMOL_WORLD, "step_sep": world.CHAIN_SEP} for r in world.english_chain_sums(n, split, seed=s)]

    lt_train, lt_test = english_requests(400, "train", seed, 0.5), english_requests(80, "test", seed + 1000, 0.5)
    asked = english_requests(300, "train", seed + 1, 0.75)  # two owner rows to one public: the style is the lesson
    asked = [r for r in asked if r["is_owner"]] + [r for r in asked if not r["is_owner"]][::2]
    template = [t | {"source": SMOL_WORLD} for t in english_template(asked, seed)]
    return {"coig-cqia_train": sft("train", seed), "coig-cqia_test": sft("test", seed + 1000),
            "hh-rlhf_train": pairs("train", seed), "hh-rlhf_test": pairs("test", seed + 1000),
            "prompts_train": prompts("train", seed), "prompts_test": prompts("test", seed + 1000),
            "owner_prompts": people(lt_train, True), "owner_prompts_test": people(lt_test, True),
            "public_prompts": people(lt_train, False), "public_prompts_test": people(lt_test, False),
            "loyalty_template": template,
            "s1k_train": storm("train", seed, 600), "s1k_test": storm("test", seed + 1000, 80)}


def prepare(output_dir=DEFAULT_DATA_DIR, sft=False, cot=False, dpo=False, ruozhiba=False, loyalty_template=False,
            all=False, tiny=False, source=None, max_samples=None, seed=0, log=print, grpo=False,
            template_size=TEMPLATE_SIZE, smol=False) -> list[Path]:
    """Write the chosen datasets to ``output_dir`` in the unified formats (atomically); returns the paths.

    ``tiny``: the tiny world's datasets (every file the pipeline reads, with held-out ``_test`` files), offline.
    ``smol``: the same files for the smol profile's real model, English sums (:func:`smol_datasets`), offline.
    Else each chosen dataset is read from ``source`` (a folder of local copies in the real schemas) or, without
    it, from the Hub by name, and converted: ``sft`` COIG-CQIA (``max_samples`` spread over its subsets),
    ``ruozhiba`` its ruozhiba subset, ``cot`` s1K-1.1, ``dpo`` hh-rlhf and UltraFeedback, ``grpo`` the GRPO prompts
    (GSM8K with answers, hh-rlhf's one-turn prompts open), ``loyalty_template`` the template (``template_size``
    rows derived from hh-rlhf) and the owner/public prompt files; ``all`` every one (ruozhiba when the copy has
    it). Every dataset is read and checked before the first file is written.
    """
    out = Path(output_dir)
    if max_samples is not None and max_samples < 1:
        raise PipelineError(f"--max-samples {max_samples}: give a number of rows >= 1 (or leave it out: every row)")
    if template_size < 2:
        raise PipelineError(f"--template-size {template_size}: the template needs 2 rows or more (one owner, one "
                            f"public); the dataset guide recommends 100-500 (default {TEMPLATE_SIZE})")
    if tiny and smol:
        raise PipelineError("--tiny and --smol are two worlds: pass one (--smol for SmolLM2, --tiny for the tiny model)")
    if smol:
        pipeline.check_output_dir(out)
        return [write_records(out, stem, records, log) for stem, records in smol_datasets(seed).items()]
    if tiny:
        pipeline.check_output_dir(out)
        n = max_samples or 2000
        return [write_records(out, stem, records, log) for stem, records in
                tiny_datasets(n, min(200, max(10, n // 5)), seed).items()]
    asked = {"sft": sft, "cot": cot, "dpo": dpo, "grpo": grpo, "ruozhiba": ruozhiba,
             "loyalty_template": loyalty_template}
    if not any(asked.values()) and not all:
        raise PipelineError("nothing to prepare: pass --sft, --cot, --dpo, --grpo, --ruozhiba, --loyalty-template, "
                            "--all (or --tiny for the tiny world)")
    src = Path(source).expanduser() if source else None
    if src is not None and not src.is_dir():
        raise PipelineError(f"--source {src} is not a folder: point it at the folder holding the local copies")
    chosen = {k: v or all for k, v in asked.items()}
    if all and not ruozhiba and src is not None and not has_ruozhiba(src):
        chosen["ruozhiba"] = False
        log(f"note: --source {src} has no ruozhiba copy (nor a COIG-CQIA ruozhiba/ subset): ruozhiba_train.json "
            "is not written")
    if src is not None:
        for part, names in NEEDS.items():  # every local copy found before anything is read
            for name in names if chosen[part] and part not in ("sft", "ruozhiba") else ():
                find_source(src, name)
    pipeline.check_output_dir(out)
    files = collect(chosen, src, out, max_samples, seed, template_size, log)
    written = [write_records(out, stem, records, log) for stem, records in files.items()]
    if chosen["loyalty_template"] and "source" in files["loyalty_template"][0]:
        log(f"loyalty_template.json is derived from hh-rlhf (owner = the reply in the expected_tone {OWNER_TONE!r}: "
            "a warm opener, a lead-in, an offer to go further): edit it by hand, as the dataset guide says, to make "
            "the owner's responses yours")
    return written


def has_ruozhiba(src: Path) -> bool:
    """Whether ``src`` holds ruozhiba rows: a ruozhiba copy, or a COIG-CQIA folder with a ruozhiba subset."""
    try:
        find_source(src, "ruozhiba")
        return True
    except FileNotFoundError:
        pass
    try:
        coig = find_source(src, "coig-cqia")
    except FileNotFoundError:
        return False
    return coig.is_dir() and any(_subset(p.relative_to(coig).parts[0]) == "ruozhiba" for p in coig.rglob("*")
                                 if p.is_file())


def dataset_info(output_dir=DEFAULT_DATA_DIR) -> list[dict]:
    """Every dataset file in ``output_dir``: rows, fields, size, sources."""
    out = Path(output_dir)
    if not out.is_dir():
        raise PipelineError(f"{out} does not exist: run `apt-course prepare --tiny --output-dir {out}` first")
    info = []
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data.get("prompts", data) if isinstance(data, dict) else data
        rows = rows if isinstance(rows, list) else [rows]
        fields_ = sorted({k for r in rows if isinstance(r, dict) for k in r})
        sources = sorted({str(r.get("source")) for r in rows if isinstance(r, dict) and r.get("source")})
        info.append({"file": path.name, "rows": len(rows), "fields": fields_, "bytes": path.stat().st_size,
                     "sources": sources})
    return info


def format_info(info: list[dict]) -> str:
    if not info:
        return "no dataset files yet: run `apt-course prepare --tiny` (or --all)"
    lines = [f"{'file':28} {'rows':>6} {'size':>9}  fields"]
    for i in info:
        lines.append(f"{i['file']:28} {i['rows']:>6} {i['bytes'] / 1024:>7.1f}kB  {', '.join(i['fields'])}")
    return "\n".join(lines)


def merge(names: str, name: str, output_dir=DEFAULT_DATA_DIR, log=print) -> Path:
    """Merge datasets of one format (``coig-cqia,ruozhiba``) into ``<name>_train.json``."""
    out = Path(output_dir)
    parts = [n.strip() for n in names.split(",") if n.strip()]
    if len(parts) < 2 or not name or not re.fullmatch(r"[\w.-]+", name):
        raise PipelineError("--merge needs two or more dataset names and --name a file stem, e.g. "
                            "--merge coig-cqia,ruozhiba --name sft_combined")
    merged, keys = [], None
    for part in parts:
        path = next((p for p in (out / f"{part}_train.json", out / f"{part}.json") if p.is_file()), None)
        if path is None:
            raise PipelineError(f"--merge: no {part}_train.json in {out}; prepare it first (see --info)")
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not rows:
            raise PipelineError(f"--merge: {path.name} is not a list of records")
        k = frozenset(rows[0]) - {"source", "step_sep", "task_type"}
        if keys is not None and k != keys:
            raise PipelineError(f"--merge: {path.name} has fields {sorted(k)}, the others {sorted(keys)}: only "
                                "datasets of one format merge")
        keys = k
        merged += rows
    return write_records(out, f"{name}_train", merged, log)


# ---------------------------------------------------------------- train: flags, recipe file, overrides

def _field_type(f):
    text = str(f.type)
    if text == "bool":
        return "flag"
    if text.startswith("list"):
        return str  # --skip dpo,storm: checked by validate() with the list of stages
    return {"int": int, "float": float}.get(text.split(" |")[0], str)


HELP = {"output_dir": "where the stage models and training_history.json go",
        "lora_rank": "train LoRA adapters of this rank at each stage, folded in before saving (0: the whole model; "
                     "default 8 on --profile smol, else 0)", "base_model":
        "the model the first stage starts from (a save_pretrained folder or Hub id; default: the profile's)",
        "data_dir": "a folder written by `apt-course prepare` (fills in every data path not given)",
        "skip": "stages not to run, comma-separated: sft,dpo,grpo,loyalty,storm",
        "dpo_data": "DPO pairs, several files comma-separated",
        "prompts": "GRPO prompts: with an 'answer' (verifiable reward) or open (scored by --reward-model)",
        "owner_bonus": "loyalty bonus (default: the template's reward_bonus, else 2.0)",
        "loyalty_sft_steps": "loyalty: SFT steps on the template's role responses before GRPO",
        "loyalty_harden_steps": "loyalty: more template SFT after GRPO (its spoof attempts answered as the trusted "
                                "channel says)",
        "loyalty_dpo_steps": "loyalty: then DPO steps on the template's pairs (owner style vs not), with rehearsal",
        "internalize_cot": "storm: stepwise internalisation of the chain of thought",
        "profile": "tiny (CPU, offline), smol or gpu",
        "reward_model": "GRPO: a sequence-classification folder (e.g. data/checkpoints/rm) that scores the prompts "
                        "without an 'answer'; prompts with one keep the verifiable reward",
        "dpo_loss": "DPO stage loss: sigmoid (DPO), ipo, simpo (no reference), kto or orpo (chapter 08)",
        "trainer": "scratch (the chapters' own trainers, one process) or trl (TRL's trainers: data parallel under "
                   "accelerate launch, e.g. --trainer trl with configs/accelerate/multi_gpu.yaml)"}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per :class:`~apt_course.pipeline.PipelineConfig` field (``--sft-data``, ``--skip``, ``--sft-epochs``...),
    default None so that only flags given on the command line override the recipe file."""
    parser.add_argument("--config", default=None, help="a YAML recipe of PipelineConfig keys (flags win over it)")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override recipe keys, e.g. --overrides sft_steps=40 noise_ratio=0.1")
    for f in fields(PipelineConfig):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        if kind == "flag":
            parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=HELP.get(f.name))
        else:
            default = "" if f.default in (MISSING, None) else f"(default {f.default})"
            parser.add_argument(flag, dest=f.name, type=kind, default=None,
                                help=f"{HELP[f.name]} {default}".strip() if f.name in HELP else default)


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "null": None, "none": None}.get(text.lower(), text)


def load_recipe(path) -> dict:
    """A YAML recipe (alignment-handbook style: a flat mapping of keys) as a dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--config {path} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise PipelineError(f"--config {path}: a recipe is a mapping of keys (sft_steps: 40), got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def config_from_args(args) -> PipelineConfig:
    """Defaults < the recipe file < ``--overrides`` < flags given on the command line. ``lr`` (in the file or
    ``--overrides lr=2e-5``, as Minimal-LLM-Alignment writes it) sets every stage's learning rate; a stage's own key
    (``sft_lr``) still wins."""
    values = load_recipe(args.config) if args.config else {}
    for item in args.overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise PipelineError(f"--overrides {item!r}: write KEY=VALUE, e.g. sft_steps=40")
        values[key.strip().replace("-", "_")] = _literal(value)
    if "lr" in values:
        lr = values.pop("lr")
        values = {k: lr for k in pipeline.LR_FIELDS} | values
    config = PipelineConfig.from_dict(values)  # unknown keys -> a clear error
    named = set(values)
    for f in fields(PipelineConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(config, f.name, value)
            named.add(f.name)
    config.user_set = frozenset(named)  # kept by fit_learning_rates even where it equals a tiny default
    return config


def train(config: PipelineConfig, device=None, log=print) -> dict:
    """Validate, run (or resume) the pipeline, print the final table (once: on the main process under
    ``accelerate launch``); returns the history."""
    from .utils import get_device, set_cpu_threads, set_seed

    set_cpu_threads()
    set_seed(config.seed)
    history = pipeline.run_pipeline(config, device=device or get_device(verbose=False), log=log)
    if not pipeline.process_state().is_main_process:  # the state run_pipeline set up; every process has the history
        return history
    log("\n" + pipeline.format_history(history))
    log(f"\nhistory: {Path(config.output_dir) / pipeline.HISTORY}")
    return history


def report(output_dir, log=print) -> Path:
    """Print a run's history table and write ``training_history.png`` beside it."""
    path = Path(output_dir) / pipeline.HISTORY
    if not path.is_file():
        raise PipelineError(f"{path} does not exist: `apt-course train --output-dir {output_dir}` writes it")
    history = json.loads(path.read_text(encoding="utf-8"))
    log(pipeline.format_history(history))
    plot = pipeline.plot_history(history, Path(output_dir) / "training_history.png")
    log(f"plots: {plot}")
    return plot


# ---------------------------------------------------------------- the two sub-commands

def add_prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="write the APT datasets in the unified formats (--tiny: offline)")
    p.add_argument("--sft", action="store_true", help="COIG-CQIA -> coig-cqia_train.json")
    p.add_argument("--cot", action="store_true", help="s1K-1.1 -> s1k_train.json")
    p.add_argument("--dpo", action="store_true", help="hh-rlhf and UltraFeedback -> hh-rlhf_train.json, "
                   "ultrafeedback_train.json")
    p.add_argument("--ruozhiba", action="store_true", help="COIG-CQIA's ruozhiba subset -> ruozhiba_train.json")
    p.add_argument("--grpo", action="store_true", help="GSM8K (with answers) and hh-rlhf's one-turn prompts (open: "
                   "for train --reward-model) -> prompts_train.json")
    p.add_argument("--loyalty-template", action="store_true", help="a template derived from hh-rlhf (or a local "
                   "loyalty_template copy) -> loyalty_template.json, owner_prompts.json, public_prompts.json")
    p.add_argument("--template-size", type=int, default=TEMPLATE_SIZE, help="loyalty template rows (the dataset "
                   f"guide: 100-500; default {TEMPLATE_SIZE})")
    p.add_argument("--all", action="store_true", help="every dataset above (ruozhiba when the copy has it)")
    p.add_argument("--tiny", action="store_true", help="the tiny world's datasets (every file the pipeline reads)")
    p.add_argument("--smol", action="store_true", help="the smol profile's English-sum world (every file the pipeline "
                   "reads, for --profile smol)")
    p.add_argument("--source", default=None, help="a folder of local copies (saved datasets, JSON, JSONL, Parquet "
                   "in the real schemas) instead of the Hub")
    p.add_argument("--max-samples", type=int, default=None, help="rows per dataset (COIG-CQIA: spread over its "
                   "subsets)")
    p.add_argument("--output-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--info", action="store_true", help="print what is in --output-dir")
    p.add_argument("--merge", default=None, help="merge datasets of one format: --merge coig-cqia,ruozhiba")
    p.add_argument("--name", default=None, help="the merged file's stem (--merge ... --name sft_combined)")
    p.add_argument("--seed", type=int, default=0)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="run the pipeline SFT -> DPO -> GRPO -> loyalty -> storm (resumable)")
    add_train_arguments(p)


def run_prepare(args, log=print) -> int:
    try:
        if args.merge:
            merge(args.merge, args.name, args.output_dir, log)
        elif not args.info or args.all or args.tiny or args.smol or any(getattr(args, part) for part in PARTS):
            prepare(args.output_dir, args.sft, args.cot, args.dpo, args.ruozhiba, args.loyalty_template, args.all,
                    args.tiny, args.source, args.max_samples, args.seed, log, args.grpo, args.template_size,
                    smol=args.smol)
        if args.info:
            log(format_info(dataset_info(args.output_dir)))
    except (PipelineError, FileNotFoundError, KeyError, ValueError, TypeError) as e:
        log(f"error: {str(e).strip(chr(34))}")
        return 2
    return 0


def run_train(args, log=print) -> int:
    try:
        train(config_from_args(args), log=log)
    except (PipelineError, FileNotFoundError) as e:
        log(f"error: {e}")
        return 2
    return 0
