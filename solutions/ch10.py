"""Worked solutions (and plausible wrong answers) for the chapter 10 exercises."""

import math
import re


def principle():
    rule = {
        "name": "calm",
        "kind": "harmless",
        "checker": "shouts",
        "critique_request": "Identify ways in which the assistant's last response shouts at the human: words in "
                            "capitals or a string of exclamation marks.",
        "revision_request": "Please rewrite the assistant response in a calm voice, without capitals or '!!'.",
        "judge_question": "Which of these assistant responses speaks more calmly?",
        "violation_critique": "it shouts.",
    }

    def shouts(row, reply):
        return bool(re.search(r"\b[A-Z]{3,}\b", reply)) or "!!" in reply

    return rule, shouts


def corrected_preference():
    def corrected(la_xy, lb_xy, la_yx, lb_yx):
        d = 0.5 * ((la_xy - lb_xy) - (la_yx - lb_yx))
        return 1 / (1 + math.exp(-d))

    return corrected


def _wrong_principle():
    rule, _ = principle()
    return rule, lambda row, reply: "!" in reply or bool(re.search(r"[A-Z]{2,}", reply))


SOLUTIONS = {
    "ch10.principle": principle,
    "ch10.corrected_preference": corrected_preference,
}

WRONG = {
    # any exclamation mark counts as shouting: "nice to meet you!" is not shouting
    "ch10.principle": _wrong_principle,
    # only one order: the judge's pull towards (A) stays in the verdict
    "ch10.corrected_preference": lambda: lambda la_xy, lb_xy, la_yx, lb_yx: 1 / (1 + math.exp(-(la_xy - lb_xy))),
}
