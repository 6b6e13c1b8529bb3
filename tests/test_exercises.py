"""Every registered exercise has a worked solution that passes and a wrong answer that fails."""

import importlib
import pkgutil
from pathlib import Path

import pytest

import solutions
from apt_course.exercises import REGISTRY, check, load_all

load_all()
SOLUTIONS, WRONG, ALSO_WRONG = {}, {}, {}
for mod in pkgutil.iter_modules(solutions.__path__):
    m = importlib.import_module(f"solutions.{mod.name}")
    SOLUTIONS.update(getattr(m, "SOLUTIONS", {}))
    WRONG.update(getattr(m, "WRONG", {}))
    ALSO_WRONG.update(getattr(m, "ALSO_WRONG", {}))  # {id: [(wrong answer, a word its hint must contain), ...]}

TRAINING_CHAPTERS = ("ch04", "ch05", "ch06", "ch07", "ch08", "ch09")
BUILD = {ch: [i for i in REGISTRY if i.startswith(f"{ch}.") and i.endswith("_step")] for ch in TRAINING_CHAPTERS}
PREDICT = {ch: [i for i in REGISTRY if i.startswith(f"{ch}.predict_")] for ch in TRAINING_CHAPTERS}


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


# ---------------------------------------------------------------- the build exercises and the predictions


def test_every_training_chapter_has_a_build_exercise_and_a_prediction():
    for ch in TRAINING_CHAPTERS:
        assert len(BUILD[ch]) == 1, f"{ch} needs one exercise `{ch}.<trainer>_step` that builds its training step"
        assert PREDICT[ch], f"{ch} needs a predict-then-run question `{ch}.predict_...`"
        assert len(ALSO_WRONG.get(BUILD[ch][0], [])) >= 3, f"{BUILD[ch][0]}: test at least 3 of the usual wrong answers"


@pytest.mark.parametrize("ex_id, k", [(i, k) for i in sorted(ALSO_WRONG) for k in range(len(ALSO_WRONG[i]))])
def test_build_checkers_name_the_usual_wrong_answers(ex_id, k):
    """Each usual mistake (no prompt mask, a flipped sign, a missing reference or KL term, the wrong reduction,
    a reference that gets gradients...) fails, and the hint names it rather than only saying "wrong number"."""
    answer, word = ALSO_WRONG[ex_id][k]
    result = check(ex_id, answer, quiet=True)
    assert not result.passed, f"{ex_id} accepted a wrong answer ({word})"
    assert word in result.message, f"{ex_id}: the hint should name the mistake ({word!r}): {result.message}"


@pytest.mark.parametrize("ex_id", sorted(i for ids in BUILD.values() for i in ids))
def test_build_checkers_fail_fast_on_the_notebook_placeholders(ex_id):
    """The notebook runs every exercise cell as shipped: `None`, or a function whose body is `...`. Both must
    print FAIL with a hint, quickly, and raise nothing (so CI runs the cell)."""
    import time

    for placeholder, hint in ((None, "function"), (lambda *args, **kwargs: None, "returned None")):
        start = time.perf_counter()
        result = check(ex_id, placeholder, quiet=True)
        assert not result.passed and hint in result.message, result.message
        assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("ex_id", sorted(i for ids in PREDICT.values() for i in ids))
def test_predictions_accept_only_their_choices(ex_id):
    for bad in (None, 3, "maybe"):
        result = check(ex_id, bad, quiet=True)
        assert not result.passed and "answer" in result.message
    right = SOLUTIONS[ex_id]()
    assert check(ex_id, f"  {right.upper()} ", quiet=True).passed  # case and spaces do not matter


def test_a_right_loss_with_a_wrong_gradient_is_caught():
    """The loss value alone is not enough: a step whose value is right but whose gradient is not fails."""
    from apt_course.lm import completion_logprobs
    from solutions.ch07 import dpo_step

    right = dpo_step()

    def wrong_gradient(policy, ref, batch, beta):  # adds 0 to the loss, but a gradient on the rejected answers
        pi_r = completion_logprobs(policy, batch, "sum").chunk(2)[1]
        return right(policy, ref, batch, beta) + (pi_r - pi_r.detach()).sum()

    result = check("ch07.dpo_step", wrong_gradient, quiet=True)
    assert not result.passed and "gradient" in result.message, result.message
