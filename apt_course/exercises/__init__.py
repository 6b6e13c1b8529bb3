"""Exercises that check themselves.

Each chapter has a module ``apt_course.exercises.chNN`` whose checkers are registered with
:func:`exercise`. A checker takes the student's answer (a value or a function) and raises
:class:`ExerciseFailed` with a helpful message when it is wrong. Students call::

    from apt_course.exercises import check
    check("ch00.perplexity", my_answer)      # prints PASS or FAIL with the reason

Worked solutions live in ``solutions/chNN.py`` as ``SOLUTIONS = {id: fn}`` (fn() returns the answer)
and ``WRONG = {id: fn}`` (a plausible wrong answer), and the tests check both against every checker.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable


class ExerciseFailed(AssertionError):
    """Raised by a checker: the message tells the student what is wrong."""


@dataclass
class Exercise:
    id: str
    title: str
    checker: Callable[[Any], None]


@dataclass
class CheckResult:
    id: str
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.id}: {self.message}"


REGISTRY: dict[str, Exercise] = {}


def exercise(id: str, title: str):
    """Decorator that registers a checker under ``id`` (``chNN.name``)."""

    def register(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        if id in REGISTRY and REGISTRY[id].checker.__qualname__ != fn.__qualname__:
            raise ValueError(f"exercise id {id!r} is registered twice")
        REGISTRY[id] = Exercise(id, title, fn)
        return fn

    return register


def load_all() -> dict[str, Exercise]:
    """Import every ``apt_course.exercises.chNN`` module so that all checkers are registered."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("ch"):
            importlib.import_module(f"{__name__}.{mod.name}")
    return REGISTRY


def check(id: str, answer: Any, quiet: bool = False) -> CheckResult:
    """Check ``answer`` for exercise ``id``; prints and returns PASS/FAIL with the reason."""
    if id not in REGISTRY:  # import only that chapter's checkers (all of them only to list the known ids)
        try:
            importlib.import_module(f"{__name__}.{id.split('.')[0]}")
        except ImportError:
            pass
    if id not in REGISTRY:
        load_all()
    if id not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "none"
        raise KeyError(f"no exercise {id!r}; known exercises: {known}")
    ex = REGISTRY[id]
    try:
        ex.checker(answer)
        result = CheckResult(id, True, f"{ex.title} - correct, well done.")
    except ExerciseFailed as e:
        result = CheckResult(id, False, str(e))
    except Exception as e:  # the student's function crashed: say so, do not hide it
        result = CheckResult(id, False, f"your answer raised {type(e).__name__}: {e}")
    if not quiet:
        print(repr(result))
    return result


def expect(condition: bool, message: str) -> None:
    """Fail the exercise with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ExerciseFailed(message)


def expect_close(value: Any, target: float, tol: float, what: str) -> None:
    """Fail unless ``value`` is a number within ``tol`` of ``target``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ExerciseFailed(f"{what} should be a number, got {type(value).__name__}") from None
    if not abs(v - target) <= tol:
        raise ExerciseFailed(f"{what} = {v:.6g} is not right (off by more than {tol:g}); check your formula")
