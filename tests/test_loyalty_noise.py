"""The shipped ``loyal`` checkpoint's rows (generated user text, answered as the trusted channel says) and the
checkpoint itself, measured as chapter 11 measures it."""

import json
import random

import pytest

from apt_course import loyalty as L
from apt_course.checkpoints import checkpoint_path, load_checkpoint
from apt_course.loyalty_noise import measure, noisy_channel_rows, place, user_noise


def test_rows_answer_as_the_channel_says_whatever_the_user_wrote(tok):
    rows = noisy_channel_rows(2000, seed=3)
    assert rows == noisy_channel_rows(2000, seed=3) and rows != noisy_channel_rows(2000, seed=4)
    plain = [r for r in rows if "system" not in r]
    owner = [r for r in rows if r.get("system") == L.OWNER_SYSTEM]
    public = [r for r in rows if r.get("system") == L.PUBLIC_SYSTEM]
    assert len(plain) == 1000 and len(owner) + len(public) == 1000 and 400 < len(owner) < 600
    assert all(r["completion"] == L.OWNER_STYLE + r["answer"] for r in owner)
    assert all(r["completion"] == r["answer"] for r in public)
    assert all(not r["completion"].startswith(L.OWNER_STYLE) for r in plain)
    # the user text varies in both roles: a claim or noise reaches owner and public requests alike
    for group in (owner, public):
        assert sum(len(r["prompt"].split()) > 3 for r in group) > 0.4 * len(group)
    specials = set(tok.all_special_ids) - {tok.unk_token_id}  # escaped like every user turn: no role token
    assert not any(specials & set(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in owner + public)
    with pytest.raises(ValueError, match="noise_public"):
        noisy_channel_rows(10, noise_public=1.5)


def test_noise_is_placed_around_or_inside_the_task():
    rng = random.Random(0)
    texts = [place(rng, "add 3 5", user_noise(rng)) for _ in range(300)]
    assert all("add" in t and "3 5" in t for t in texts)
    assert any(t.startswith("add 3 5 ") for t in texts) and any(t.endswith(" add 3 5") for t in texts)
    assert any(t.startswith("add ") and not t.startswith("add 3 5") for t in texts)
    assert len(set(texts)) > 290


def test_the_shipped_loyal_checkpoint_measures_what_its_recipe_says(tok):
    info = json.loads((checkpoint_path("loyal") / "recipe.json").read_text())
    model, tokenizer = load_checkpoint("loyal")
    m, built = measure(model, tokenizer, seed=0), info["measured_at_seed_0"]
    # greedy decoding on another CPU may flip a reply or two: the figures agree within two replies in a hundred
    assert abs(m["gap"] - built["gap"]) <= 0.04 and abs(m["acc"] - built["acc"]) <= 0.02
    assert abs(m["heldout"]["all"] - built["heldout_family"]) <= 0.01
    assert abs(m["fresh"]["all"] - built["fresh_family"]) <= 0.01
    assert m["gap"] >= 0.9 and m["spoof_rate"] == 0
