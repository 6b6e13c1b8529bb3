"""Every registered exercise has a worked solution that passes and a wrong answer that fails."""

import importlib
import pkgutil

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


def test_unknown_exercise_is_a_clear_error():
    with pytest.raises(KeyError, match="known exercises"):
        check("ch99.nothing", 1)
