"""Worked solutions (and plausible wrong answers) for the chapter 15 exercises."""

import math
from statistics import NormalDist


def percentile():
    def pct(values, q):
        xs = sorted(values)
        r = q / 100 * (len(xs) - 1)
        lo, hi = math.floor(r), math.ceil(r)
        return xs[lo] + (r - lo) * (xs[hi] - xs[lo])

    return pct


def sample_size():
    def n_per_arm(p_a, p_b, alpha=0.05, power=0.8):
        z = NormalDist().inv_cdf
        p = (p_a + p_b) / 2
        root = z(1 - alpha / 2) * math.sqrt(2 * p * (1 - p)) + z(power) * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b))
        return math.ceil(root**2 / (p_b - p_a) ** 2)

    return n_per_arm


def feedback_pairs():
    def to_pairs(log):
        groups = {}
        for i, row in enumerate(log):
            if row.get("thumbs") not in ("up", "down"):
                raise ValueError(f"row {i}: thumbs must be 'up' or 'down', got {row.get('thumbs')!r}")
            g = groups.setdefault(row["prompt"], {"up": [], "down": []})
            if row["reply"] not in g[row["thumbs"]]:
                g[row["thumbs"]].append(row["reply"])
        pairs = []
        for prompt, g in groups.items():
            ups = [r for r in g["up"] if r not in g["down"]]
            downs = [r for r in g["down"] if r not in g["up"]]
            pairs += [{"prompt": prompt, "chosen": u, "rejected": d} for u in ups for d in downs]
        return pairs

    return to_pairs


def _nearest_rank():
    def pct(values, q):
        xs = sorted(values)
        return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]

    return pct


def _keeps_conflicts():
    def to_pairs(log):
        ups = [(r["prompt"], r["reply"]) for r in log if r["thumbs"] == "up"]
        downs = [(r["prompt"], r["reply"]) for r in log if r["thumbs"] == "down"]
        return [{"prompt": p, "chosen": u, "rejected": d} for p, u in ups for q, d in downs if p == q and u != d]

    return to_pairs


SOLUTIONS = {
    "ch15.percentile": percentile,
    "ch15.sample_size": sample_size,
    "ch15.feedback_pairs": feedback_pairs,
}

WRONG = {
    # the nearest order statistic, not interpolated
    "ch15.percentile": _nearest_rank,
    # the total over both arms
    "ch15.sample_size": lambda: lambda p_a, p_b, alpha=0.05, power=0.8: 2 * sample_size()(p_a, p_b, alpha, power),
    # keeps a reply thumbed both up and down, and never checks the thumbs
    "ch15.feedback_pairs": _keeps_conflicts,
}
