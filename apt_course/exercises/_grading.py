"""The grader of the build exercises: the course's parity machinery (same batch, same model, compare the loss
and every parameter's gradient) pointed at a learner's function instead of the package's.

A build exercise's checker makes a tiny model and a batch, runs the learner's step function, and compares

* the loss with the package's on the same batch (and, when it does not match, with the usual wrong answers,
  to say which one it is);
* the gradient of every trainable parameter with the package's (a right value with a wrong gradient means
  something is detached that should not be, or the other way round);
* the loss and the gradients with TRL's trainer (``compute_loss`` on its own collated batch) where TRL has one.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from . import ExerciseFailed, expect

LOSS_TOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-3


@functools.lru_cache(maxsize=1)
def tokenizer():
    from ..tokenizer import build_tokenizer

    return build_tokenizer()


def tiny_lm(seed: int = 0):
    """A fresh tiny Llama (the course's tiny model, deterministic for a seed), in training mode."""
    from ..model import make_tiny_model

    return make_tiny_model(tokenizer(), seed=seed).train()


@contextlib.contextmanager
def quiet():
    """No progress bars, library warnings or info logs while a checker builds a TRL trainer."""
    import datasets
    import transformers

    bars = datasets.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def own_rng(checker):
    """Run a checker with its own random state: the tiny models and rollouts it seeds leave the notebook's
    ``torch`` random state as it was."""

    @functools.wraps(checker)
    def run(answer):
        with torch.random.fork_rng(devices=[]):
            return checker(answer)

    return run


def explain(text: str) -> None:
    """A predict-then-run checker's explanation, printed when the prediction is right (a wrong one gets it as
    its failure message's hint instead)."""
    print(text)


def prediction(answer, right: str, choices: tuple[str, ...], hint: str, explanation: str) -> None:
    """Check a predict-then-run answer: one of ``choices`` (case and surrounding spaces ignored), else a failure
    listing them; ``right``, else a failure carrying ``hint``; then print ``explanation``."""
    listed = ", ".join(f'"{c}"' for c in choices[:-1]) + f' or "{choices[-1]}"'
    expect(isinstance(answer, str) and answer.strip().lower() in choices, f"answer {listed}")
    expect(answer.strip().lower() == right, hint)
    explain(explanation)


def trl_output_dir() -> str:
    """The scratch ``output_dir`` a checker's TRL trainer is given (it saves nothing there)."""
    import os
    import tempfile

    return os.path.join(tempfile.gettempdir(), "apt_course_exercise_trl")


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(out, model, name: str = "your function", frozen=None):
    """``(loss, {parameter name: gradient})`` of a returned loss; fails with a hint unless it is a scalar tensor
    whose gradient reaches ``model``, and (with ``frozen``, a reference model) none reaches ``frozen``."""
    expect(out is not None, f"{name} returned None: did you forget `return`?")
    if isinstance(out, tuple) and out and torch.is_tensor(out[0]):
        out = out[0]  # (loss, stats) as the package's functions return: take the loss
    expect(torch.is_tensor(out) and out.dim() == 0, f"{name} must return the loss, a scalar tensor; got "
                                                    f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    expect(out.requires_grad, f"{name}'s loss has no gradient: the policy's forward pass must not run under "
                              "torch.no_grad(), and the loss must not be .detach()ed or turned into a number")
    expect(torch.isfinite(out).item(), f"{name} returned a loss of {out.item()}: not a finite number")
    if frozen is not None:
        ref_params = [p for p in frozen.parameters() if p.requires_grad]
        leaked = torch.autograd.grad(out, ref_params, retain_graph=True, allow_unused=True)
        expect(all(g is None or not g.any() for g in leaked),
               "the reference model got gradients: it is frozen, so compute its log-probs under torch.no_grad() "
               "(the value is the same, but the step would train both models)")
    params = trainable(model)
    grads = torch.autograd.grad(out, list(params.values()), allow_unused=True)
    return out.detach(), {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(params.items(), grads)}


def close(a, b, tol: float = LOSS_TOL) -> bool:
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def compare(got, want, wrong: dict[str, float], formula: str, against: str = "the package's") -> None:
    """Fail unless the losses ``got`` and ``want`` agree; when they do not and ``got`` equals one of the
    ``wrong`` answers' losses ({hint: value}), the failure is that hint."""
    if close(got, want):
        return
    for hint, value in wrong.items():
        if close(got, value) and not close(value, want):
            raise ExerciseFailed(hint)
    raise ExerciseFailed(f"your loss {float(got):.6f} is not {against} {float(want):.6f} on the same batch: {formula}")


def compare_grads(got: dict, want: dict, against: str = "the package's") -> None:
    """Fail unless every parameter's gradient agrees (names as ``named_parameters`` gives them)."""
    bad = [k for k in want if k not in got or not torch.allclose(got[k], want[k], atol=GRAD_ATOL, rtol=GRAD_RTOL)]
    if bad:
        k = bad[0]
        diff = (got[k] - want[k]).abs().max().item() if k in got else float("nan")
        raise ExerciseFailed(f"the loss value is right but its gradient is not {against}: {len(bad)} of {len(want)} "
                             f"parameters differ (first {k!r}, by up to {diff:.2g}). Something is detached that "
                             "should carry a gradient, or carries one that should be detached (e.g. the old "
                             "log-probs, the advantages, the reference)")


def same_names(grads: dict, prefix: str = "") -> dict:
    """Gradients keyed by parameter name without a wrapper's prefix (TRL may wrap the model)."""
    return {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in grads.items()}
