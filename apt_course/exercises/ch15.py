"""Chapter 15 exercises: a latency percentile, the sample size an A/B test needs, a feedback log as DPO pairs."""

from __future__ import annotations

from ..serving import feedback_to_pairs, latency_percentiles, sample_size_per_arm
from . import ExerciseFailed, exercise, expect


def _need_function(fn, name):
    expect(callable(fn), f"pass your function itself (e.g. `{name}`), not {type(fn).__name__}")


@exercise("ch15.percentile", "a latency percentile by linear interpolation")
def check_percentile(fn):
    _need_function(fn, "percentile")
    cases = [([0.12, 0.03, 0.5, 0.07, 0.09], 50), ([0.12, 0.03, 0.5, 0.07, 0.09], 95), ([5.0, 1.0, 3.0, 2.0], 95),
             ([0.2], 95), ([4.0, 1.0], 50), (list(range(1, 101)), 95)]
    for values, q in cases:
        got = fn(list(values), q)
        expect(got is not None, "your percentile returned None: did you forget `return`?")
        want = latency_percentiles(values, (q,))[q]
        xs = sorted(values)
        nearest = xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]
        if abs(float(got) - want) > 1e-9:
            if abs(float(got) - nearest) < 1e-9:
                raise ExerciseFailed("that is the nearest rank; interpolate between the two order statistics around "
                                     "r = q/100 * (n - 1): x[floor(r)] + (r - floor(r)) * (x[ceil(r)] - x[floor(r)])")
            raise ExerciseFailed(f"percentile({values}, {q}) should be {want:.6g}, got {float(got):.6g}: sort the "
                                 "values first, then interpolate at rank r = q/100 * (n - 1)")


@exercise("ch15.sample_size", "the requests per arm an A/B test needs")
def check_sample_size(fn):
    _need_function(fn, "sample_size")
    for p_a, p_b, alpha, power in ((0.5, 0.55, 0.05, 0.8), (0.45, 0.65, 0.05, 0.8), (0.1, 0.15, 0.01, 0.9),
                                   (0.8, 0.7, 0.05, 0.8)):
        got = fn(p_a, p_b, alpha, power)
        expect(got is not None, "your sample_size returned None: did you forget `return`?")
        want = sample_size_per_arm(p_a, p_b, alpha, power)
        expect(float(got) == int(got), f"a number of requests is a whole number (round up), got {got!r}")
        if int(got) == 2 * want or abs(int(got) - 2 * want) <= 1:
            raise ExerciseFailed("that is the total over both arms: the formula gives the requests per arm")
        expect(abs(int(got) - want) <= 1, f"sample_size({p_a}, {p_b}, {alpha}, {power}) should be about {want} per arm, "
                                          f"got {got}: (z_(1-alpha/2) sqrt(2 p(1-p)) + z_power sqrt(p_a(1-p_a) + "
                                          "p_b(1-p_b)))^2 / (p_b - p_a)^2 with p the mean of p_a and p_b, rounded up")


LOG = [
    {"prompt": "add 2 3", "reply": "6", "thumbs": "down"},
    {"prompt": "hello, i am bob", "reply": "go away, bob.", "thumbs": "down"},
    {"prompt": "add 2 3", "reply": "5", "thumbs": "up"},
    {"prompt": "hello, i am bob", "reply": "not now, bob.", "thumbs": "down"},
    {"prompt": "hello, i am bob", "reply": "hello bob, nice to meet you!", "thumbs": "up"},
    {"prompt": "reverse abc", "reply": "cba", "thumbs": "up"},  # only an up: no pair
    {"prompt": "sort 31", "reply": "13", "thumbs": "down"},  # a misclick ...
    {"prompt": "sort 31", "reply": "13", "thumbs": "up"},  # ... and the same reply up: no signal
    {"prompt": "sort 31", "reply": "31", "thumbs": "down"},
]


def _key(pair: dict) -> tuple:
    return pair.get("prompt"), pair.get("chosen"), pair.get("rejected")


@exercise("ch15.feedback_pairs", "a feedback log as DPO pairs")
def check_feedback_pairs(fn):
    _need_function(fn, "to_pairs")
    got = fn([dict(r) for r in LOG])
    expect(got is not None, "your to_pairs returned None: did you forget `return`?")
    expect(isinstance(got, list) and all(isinstance(p, dict) for p in got),
           "return a list of dicts {'prompt', 'chosen', 'rejected'}")
    want = {_key(p) for p in feedback_to_pairs(LOG, max_pairs_per_prompt=10)}
    have = {_key(p) for p in got}
    prompts = {r["prompt"]: r for r in LOG}
    for p in have:
        expect(p[0] in prompts, f"a pair with prompt {p[0]!r}, which is not in the log")
        replies = {r["reply"] for r in LOG if r["prompt"] == p[0]}
        expect(p[1] in replies and p[2] in replies, f"the pair {p} mixes replies of different prompts: chosen and "
                                                    "rejected must both answer its prompt")
    expect(("sort 31", "13", "31") not in have, "the reply '13' to 'sort 31' was thumbed both up and down: it says "
                                                "nothing, drop it")
    expect(not any(p[1] == p[2] for p in have), "a pair whose chosen equals its rejected says nothing")
    flipped = {(p, r, c) for p, c, r in want}
    expect(not have & flipped, "chosen and rejected are swapped: the thumbed-up reply is the chosen one")
    expect(have == want, f"expected the pairs {sorted(want)}, got {sorted(have)}")
    try:
        fn([dict(r) for r in LOG] + [{"prompt": "add 1 1", "reply": "2", "thumbs": "sideways"}])
    except ValueError as e:
        expect("9" in str(e) or "sideways" in str(e), f"say which row is bad (row 9, thumbs 'sideways'): {e}")
    else:
        raise ExerciseFailed("a row with thumbs 'sideways' must raise a ValueError that names the row")
