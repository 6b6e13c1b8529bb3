"""Every registered exercise has a worked solution that passes and a wrong answer that fails."""

import importlib
import pkgutil
from pathlib import Path

import pytest

import solutions
from apt_course.exercises import REGISTRY, check, load_all

load_all()
SOLUTIONS, WRONG = {}, {}
for mod in pkgutil.iter_modules(solutions.__path__):
    m = importlib.import_module(f"solutions.{mod.name}")
    SOLUTIONS.update(getattr(m, "SOLUTIONS", {}))
    WRONG.update(getattr(m, "WRONG", {}))


@pytest.mark.parametrize("ex_id", sorted(REGISTRY))
def test_solution_passes(ex_id):
    assert ex_id in SOLUTIONS, f"{ex_id} has no worked solution in solutions/"
    assert check(ex_id, SOLUTIONS[ex_id]()).passed


@pytest.mark.parametrize("ex_id", sorted(REGISTRY))
def test_wrong_answer_fails(ex_id):
    assert ex_id in WRONG, f"{ex_id} has no wrong answer in solutions/ to prove its checker can fail"
    result = check(ex_id, WRONG[ex_id]())
    assert not result.passed and result.message
    # a checker's own hint reaches the learner as a hint, not as a crash blamed on their answer
    assert not result.message.startswith("your answer raised"), result.message


def test_checkers_raise_exercise_failed_not_assertion_error():
    """``check`` reports any other exception as the student's crash ("your answer raised AssertionError: ..."),
    so a checker's hint must be an ``ExerciseFailed`` (via ``expect``), never a bare ``assert``/AssertionError."""
    import ast

    from apt_course import exercises

    for path in Path(exercises.__file__).parent.glob("ch*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            assert not isinstance(node, ast.Assert), f"{path.name}:{node.lineno} uses assert; use expect(...)"
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = getattr(node.exc.func, "id", "")
                assert name != "AssertionError", f"{path.name}:{node.lineno} raises AssertionError; raise ExerciseFailed"


def test_a_hint_is_reported_as_a_hint_and_a_crash_as_a_crash():
    from apt_course.exercises import ExerciseFailed, exercise

    @exercise("test.hint", "a test exercise")
    def checker(answer):
        if answer == "hint":
            raise ExerciseFailed("try the other sign")
        answer()

    try:
        assert check("test.hint", "hint", quiet=True).message == "try the other sign"
        crashed = check("test.hint", lambda: 1 / 0, quiet=True)
        assert not crashed.passed and crashed.message.startswith("your answer raised ZeroDivisionError")
    finally:
        REGISTRY.pop("test.hint")


def test_unknown_exercise_is_a_clear_error():
    with pytest.raises(KeyError, match="known exercises"):
        check("ch99.nothing", 1)
