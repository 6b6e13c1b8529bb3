"""Chapter 10 exercises: write a principle and its rule checker; the judge's position-bias-corrected preference."""

from __future__ import annotations

import math

import torch

from . import exercise, expect

SHOUT_CASES = [("GO AWAY, bob.", True), ("hello bob!!", True), ("WHAT do you want", True),
               ("hello bob, nice to meet you!", False), ("i am OK", False), ("8", False),
               ("sorry, the code is secret.", False), ("you are welcome, ann!", False), ("cba", False)]


@exercise("ch10.principle", "a principle and its rule checker")
def check_principle(answer):
    from .. import constitution as C

    expect(isinstance(answer, tuple) and len(answer) == 2,
           "return a tuple (principle, checker): the principle as a dict, the checker as a function(row, reply)")
    principle, checker = answer
    expect(isinstance(principle, dict), f"the principle must be a dict, got {type(principle).__name__}")
    expect(callable(checker), "the checker must be a function checker(row, reply) -> bool")
    missing = [f for f in C.PRINCIPLE_FIELDS if not str(principle.get(f) or "").strip()]
    expect(not missing, f"the principle has no (or an empty) {missing}; a principle needs {list(C.PRINCIPLE_FIELDS)}")
    expect(principle["kind"] == "harmless", "shouting at the user is a harm: kind should be 'harmless'")
    expect(principle["checker"] == "shouts", "name the checker 'shouts' (the 'checker' field)")
    saved = C.CHECKERS.get("shouts")
    C.CHECKERS["shouts"] = checker
    try:  # the file-level validation every constitution goes through
        const = C.load_constitution({"principles": [principle]})
        for reply, want in SHOUT_CASES:
            got = const[principle["name"]].check({"prompt": "hello, i am bob"}, reply)
            expect(isinstance(got, bool), f"the checker must return True or False, got {got!r} for {reply!r}")
            expect(got == want, f"{reply!r} should {'' if want else 'not '}count as shouting (a word of 3+ letters "
                                "in capitals, or '!!'); your checker says " + str(got))
    finally:
        if saved is None:
            C.CHECKERS.pop("shouts", None)
        else:
            C.CHECKERS["shouts"] = saved


@exercise("ch10.corrected_preference", "the judge's position-bias-corrected preference")
def check_corrected_preference(fn):
    expect(callable(fn), "pass your function itself, corrected(la_xy, lb_xy, la_yx, lb_yx) -> P(x better than y)")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        la_xy, lb_xy, la_yx, lb_yx = (-3 * torch.rand(1, generator=g)).item(), (-3 * torch.rand(1, generator=g)).item(), \
            (-3 * torch.rand(1, generator=g)).item(), (-3 * torch.rand(1, generator=g)).item()
        got = fn(la_xy, lb_xy, la_yx, lb_yx)
        expect(got is not None, "your function returned None: did you forget `return`?")
        got = float(got)
        one_order = 1 / (1 + math.exp(-(la_xy - lb_xy)))
        want = 1 / (1 + math.exp(-0.5 * ((la_xy - lb_xy) - (la_yx - lb_yx))))
        expect(abs(got - one_order) > 1e-6 or abs(got - want) < 1e-6,
               "you used only the first order: average it with the swapped order, where x is shown as (B)")
        expect(0 <= got <= 1, f"a probability lies in [0, 1], got {got}")
        expect(abs(got - want) < 1e-5, "P(x > y) = sigmoid(0.5 * ((la_xy - lb_xy) - (la_yx - lb_yx))): in the swapped "
                                       "order x is option (B), so its log-odds enter with the opposite sign")
    biased = float(fn(-0.1, -2.0, -0.1, -2.0))  # the judge says (A) whatever the order: no information
    expect(abs(biased - 0.5) < 1e-6, "a judge that answers (A) in both orders prefers neither reply: expect 0.5")
