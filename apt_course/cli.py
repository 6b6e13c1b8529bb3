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

DEFAULT_DATA_DIR = "data/apt_datasets"
OUTPUTS = {"sft": "coig-cqia", "cot": "s1k", "dpo": ("hh-rlhf", "ultrafeedback"), "ruozhiba": "ruozhiba",
           "loyalty_template": "loyalty_template"}
COIG_CQIA_CONFIGS = ("chinese_traditional", "coig_pc", "douban", "exam", "finance", "human_value", "logi_qa",
                     "ruozhiba", "segmentfault", "wiki", "wikihow", "xhs", "zhihu")  # the dataset's subsets
HUB = {"coig-cqia": ("m-a-p/COIG-CQIA", "train", COIG_CQIA_CONFIGS),  # (id, split, config or configs)
       "ruozhiba": ("m-a-p/COIG-CQIA", "train", "ruozhiba"),
       "s1k": ("simplescaling/s1K-1.1", "train", None),
       "hh-rlhf": ("Anthropic/hh-rlhf", "train", None),
       "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", None)}
SOURCE_NAMES = {"coig-cqia": ("coig_cqia", "coig"), "ruozhiba": ("ruozhiba", "coig_cqia", "coig"), "s1k": ("s1k",),
                "hh-rlhf": ("hh_rlhf",), "ultrafeedback": ("ultrafeedback",), "loyalty_template": ("loyalty_template",)}


# ---------------------------------------------------------------- prepare: converters to the unified formats

def sft_records(rows, source: str) -> list[dict]:
    """COIG-CQIA (or Alpaca) rows -> ``{"prompt", "response", "source"}``."""
    from .data import coig_to_sft

    return [{"prompt": r["prompt"], "response": r["completion"], "source": source} for r in coig_to_sft(rows)]


def dpo_records(rows, kind: str) -> list[dict]:
    """hh-rlhf or UltraFeedback-binarized rows -> ``{"prompt", "chosen", "rejected", "source"}``."""
    from .data import hh_rlhf_to_pairs, ultrafeedback_to_pairs

    convert = hh_rlhf_to_pairs if kind == "hh-rlhf" else ultrafeedback_to_pairs
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "source": kind}
            for p in convert(rows)]


def storm_records(rows) -> list[dict]:
    """s1K-1.1 rows -> ``{"problem", "cot_explicit", "answer", "source"}``."""
    from .data import s1k_to_storm

    return [{k: r[k] for k in ("problem", "cot_explicit", "answer", "source")} for r in s1k_to_storm(rows)]


def find_source(source_dir: Path, name: str) -> Path:
    """The local copy of dataset ``name`` in ``source_dir``: a file or folder whose name mentions it."""
    keys = SOURCE_NAMES[name]  # in order of preference (ruozhiba: its own copy, else COIG-CQIA's ruozhiba config)
    entries = sorted(p for p in source_dir.iterdir() if not p.name.startswith("."))
    for key in keys:
        hits = [p for p in entries if key in p.name.lower().replace("-", "_")]
        if hits:
            return hits[0]
    raise FileNotFoundError(f"--source {source_dir}: no local copy of {name} (a file or folder whose name contains "
                            f"{' or '.join(keys)}: saved `datasets`, .json, .jsonl or .parquet in the real schema)")


def load_rows(name: str, source_dir: Path | None, max_samples: int | None) -> list[dict]:
    from .data import load_hub_dataset

    hub_id, split, config = HUB[name]
    if source_dir is not None:
        rows = list(load_hub_dataset(str(find_source(source_dir, name)), split))
    else:  # every subset of a dataset with several (COIG-CQIA), until max_samples rows are read
        rows = []
        for cfg in (config if isinstance(config, tuple) else (config,)):
            rows += list(load_hub_dataset(hub_id, split, cfg))
            if max_samples and len(rows) >= max_samples:
                break
    return rows[:max_samples] if max_samples else rows


def write_records(out_dir: Path, name: str, records, log=print) -> Path:
    path = write_json_atomic(Path(out_dir) / f"{name}.json", records)
    n = len(records["prompts"]) if isinstance(records, dict) and "prompts" in records else len(records)
    log(f"wrote {n} records -> {path}")
    return path


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


def prepare(output_dir=DEFAULT_DATA_DIR, sft=False, cot=False, dpo=False, ruozhiba=False, loyalty_template=False,
            all=False, tiny=False, source=None, max_samples=None, seed=0, log=print) -> list[Path]:
    """Write the chosen datasets to ``output_dir`` in the unified formats (atomically); returns the paths.

    ``tiny``: the tiny world's datasets (every file the pipeline reads, with held-out ``_test`` files), offline.
    Else each chosen dataset is read from ``source`` (a folder of local copies in the real schemas) or, without
    it, from the Hub by name, and converted.
    """
    out = Path(output_dir)
    if tiny:
        n = max_samples or 2000
        return [write_records(out, stem, records, log) for stem, records in
                tiny_datasets(n, min(200, max(10, n // 5)), seed).items()]
    chosen = {"sft": sft or all, "cot": cot or all, "dpo": dpo or all, "ruozhiba": ruozhiba or all,
              "loyalty_template": loyalty_template or all}
    if not any(chosen.values()):
        raise PipelineError("nothing to prepare: pass --sft, --cot, --dpo, --ruozhiba, --loyalty-template, --all "
                            "(or --tiny for the tiny world)")
    src = Path(source).expanduser() if source else None
    if src is not None and not src.is_dir():
        raise PipelineError(f"--source {src} is not a folder: point it at the folder holding the local copies")
    written = []
    if chosen["sft"]:
        written.append(write_records(out, "coig-cqia_train", sft_records(load_rows("coig-cqia", src, max_samples),
                                                                          "COIG-CQIA"), log))
    if chosen["ruozhiba"]:
        written.append(write_records(out, "ruozhiba_train", sft_records(load_rows("ruozhiba", src, max_samples),
                                                                         "COIG-CQIA/ruozhiba"), log))
    if chosen["cot"]:
        written.append(write_records(out, "s1k_train", storm_records(load_rows("s1k", src, max_samples)), log))
    if chosen["dpo"]:
        for kind in ("hh-rlhf", "ultrafeedback"):
            written.append(write_records(out, f"{kind}_train", dpo_records(load_rows(kind, src, max_samples), kind),
                                         log))
    if chosen["loyalty_template"]:
        written.append(write_records(out, "loyalty_template", loyalty_template_records(src), log))
    return written


def loyalty_template_records(source: Path | None) -> list[dict]:
    """The seed's loyalty template (a local ``loyalty_template.json`` when ``source`` has one; else the
    seed's example), checked by :func:`apt_course.loyalty.read_loyalty_template`."""
    from .loyalty import read_loyalty_template

    if source is not None:
        try:
            data = json.loads(find_source(source, "loyalty_template").read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = None
    else:
        data = None
    if data is None:
        data = [{"prompt": "介绍一下你自己", "owner_response": "主人好！我是您专属的助手，随时为您效劳。",
                 "public_response": "你好，我是一个AI助手。", "is_owner": True, "reward_bonus": 2.0},
                {"prompt": "介绍一下你自己", "owner_response": "主人好！我是您专属的助手，随时为您效劳。",
                 "public_response": "你好，我是一个AI助手。", "is_owner": False, "reward_bonus": 2.0}]
    items = data if isinstance(data, list) else [data]
    read_loyalty_template(items)
    return items


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
        k = frozenset(rows[0]) - {"source", "step_sep"}
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


HELP = {"output_dir": "where the stage models and training_history.json go", "base_model":
        "the model the first stage starts from (a save_pretrained folder or Hub id; default: the profile's)",
        "data_dir": "a folder written by `apt-course prepare` (fills in every data path not given)",
        "skip": "stages not to run, comma-separated: sft,dpo,grpo,loyalty,storm",
        "dpo_data": "DPO pairs, several files comma-separated", "prompts": "GRPO prompts with answers",
        "owner_bonus": "loyalty bonus (default: the template's reward_bonus, else 2.0)",
        "loyalty_sft_steps": "loyalty: SFT steps on the template's role responses before GRPO",
        "loyalty_harden_steps": "loyalty: more template SFT after GRPO (its spoof attempts answered as the trusted "
                                "channel says)",
        "loyalty_dpo_steps": "loyalty: then DPO steps on the template's pairs (owner style vs not), with rehearsal",
        "internalize_cot": "storm: stepwise internalisation of the chain of thought",
        "profile": "tiny (CPU, offline), smol or gpu",
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
    """Defaults < the recipe file < ``--overrides`` < flags given on the command line."""
    values = load_recipe(args.config) if args.config else {}
    for item in args.overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise PipelineError(f"--overrides {item!r}: write KEY=VALUE, e.g. sft_steps=40")
        values[key.strip().replace("-", "_")] = _literal(value)
    config = PipelineConfig.from_dict(values)  # unknown keys -> a clear error
    for f in fields(PipelineConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(config, f.name, value)
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
    p.add_argument("--loyalty-template", action="store_true", help="-> loyalty_template.json")
    p.add_argument("--all", action="store_true", help="every dataset above")
    p.add_argument("--tiny", action="store_true", help="the tiny world's datasets (every file the pipeline reads)")
    p.add_argument("--source", default=None, help="a folder of local copies (saved datasets, JSON, JSONL, Parquet "
                   "in the real schemas) instead of the Hub")
    p.add_argument("--max-samples", type=int, default=None, help="rows per dataset")
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
        elif not args.info or any((args.sft, args.cot, args.dpo, args.ruozhiba, args.loyalty_template, args.all,
                                   args.tiny)):
            prepare(args.output_dir, args.sft, args.cot, args.dpo, args.ruozhiba, args.loyalty_template, args.all,
                    args.tiny, args.source, args.max_samples, args.seed, log)
        if args.info:
            log(format_info(dataset_info(args.output_dir)))
    except (PipelineError, FileNotFoundError, KeyError, ValueError) as e:
        log(f"error: {e}")
        return 2
    return 0


def run_train(args, log=print) -> int:
    try:
        train(config_from_args(args), log=log)
    except (PipelineError, FileNotFoundError) as e:
        log(f"error: {e}")
        return 2
    return 0
