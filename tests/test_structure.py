"""The package's shape: chapter modules import only earlier chapters and the shared layer, never a later chapter;
the shared layer imports no chapter at all (so chapter 06 does not pull in chapter 09 before it is taught)."""

import ast
from pathlib import Path

import apt_course

PACKAGE = Path(apt_course.__file__).parent

# chapter modules, by the chapter that teaches them
CHAPTER = {"pretrain": 0, "mdp": 1, "reinforce": 2, "ppo": 3, "sft": 4, "reward_model": 5, "rlhf": 6, "dpo": 7,
           "orpo": 8, "grpo": 9, "constitution": 10, "loyalty": 11, "attacks_heldout": 11, "attacks_fresh": 11, "loyalty_style": 11,
           "loyalty_noise": 11, "storm": 12, "pipeline": 13, "pipeline_trl": 13, "pipeline_data": 13,
           "compress": 14, "serving": 15}
# shared layer: may import each other, never a chapter module
SHARED = {"utils", "world", "tokenizer", "model", "lm", "training", "results", "plots", "profiles", "data",
          "evaluate", "envs", "checkpoints", "rewards", "real_model"}
# tools on top of everything (command line, notebook runner, checkpoint recipes, exercise checkers)
TOOLS = {"__init__", "__main__", "runner", "recipes", "cli", "launcher", "standins"}


def _imports(path: Path) -> set[str]:
    """Package-internal modules ``path`` imports, lazily inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.level == 2 and node.module:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("apt_course."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("apt_course."))
    return found - {"exercises"}


def test_every_module_is_classified():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    unknown = modules - set(CHAPTER) - SHARED - TOOLS
    assert not unknown, f"classify {sorted(unknown)} in tests/test_structure.py (chapter, shared or tool)"


def test_chapter_modules_import_only_earlier_chapters():
    for path in PACKAGE.glob("*.py"):
        if path.stem not in CHAPTER:
            continue
        for dep in _imports(path):
            if dep in CHAPTER:
                assert CHAPTER[dep] <= CHAPTER[path.stem], (
                    f"{path.stem} (chapter {CHAPTER[path.stem]:02d}) imports {dep} (chapter {CHAPTER[dep]:02d}): a "
                    "chapter may only build on earlier chapters; move the shared code to the shared layer (lm, data...)")


def test_shared_layer_imports_no_chapter():
    for path in PACKAGE.glob("*.py"):
        if path.stem in SHARED:
            chapters = _imports(path) & set(CHAPTER)
            assert not chapters, f"shared module {path.stem} imports chapter module(s) {sorted(chapters)}"


def test_exercise_checkers_import_only_their_chapter_and_earlier():
    for path in (PACKAGE / "exercises").glob("ch*.py"):
        number = int(path.stem[2:])
        for dep in _imports(path) & set(CHAPTER):
            assert CHAPTER[dep] <= number, f"exercises/{path.name} imports {dep} (chapter {CHAPTER[dep]:02d})"


def test_the_import_graph_check_can_fail(tmp_path):
    bad = tmp_path / "rlhf.py"
    bad.write_text("from .grpo import sample_groups\n\ndef f():\n    from apt_course.storm import x\n")
    assert _imports(bad) == {"grpo", "storm"}
