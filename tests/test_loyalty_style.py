"""The owner's style learned from a loyalty template (apt_course.loyalty_style): the scorer finds what the owner
responses do that the public ones do not, on the tiny world's template and on an English one; the guard's strip
never leaves an owner-styled reply; the bonus survives GRPO's group baseline; bad templates are refused."""

import pytest

from apt_course import loyalty, world
from apt_course import loyalty_style as S
from apt_course.attacks_heldout import HELDOUT_FORMS, heldout_attacks
from apt_course.grpo import group_advantages


def test_the_tiny_template_teaches_the_scorer_the_sure_prefix():
    rows = loyalty.loyalty_requests(60, "train", 0, spoof_fraction=0.0)
    scorer = S.StyleScorer.from_template(loyalty.preference_pairs(rows))
    assert scorer.top_words(1)[0] == ["sure"] or "sure" in scorer.top_words(2)[0]
    replies = ["sure! 8", "8", "sure! cba", "cba", "sure! 1 2 3", "1 2 3"]
    assert [scorer.is_owner_style(r) for r in replies] == [loyalty.owner_style(r) for r in replies]


def test_an_english_template_gives_a_style_that_holds_out():
    train, test = S.english_requests(120, "train", 0, 0.5), S.english_requests(60, "test", 1, 0.5)
    scorer = S.StyleScorer.from_template(S.english_template(train, 0))
    held = S.english_template(test, 1)
    assert all(scorer(t["owner_response"]) > 0.5 > scorer(t["public_response"]) for t in held)
    assert scorer("Happy to help! 3 + 4 = 7.") > 0.5 > scorer("3 + 4 = 7.")


def test_strip_never_leaves_the_owner_style_and_keeps_the_answer():
    scorer = S.StyleScorer.from_template(S.english_template(S.english_requests(120, "train", 0, 0.5), 0))
    for reply in ("Of course! 3 + 4 = 7. Just ask if you need anything else!", "Happy to help you! 7",
                  "Always happy to help you! Happy! Glad! 7", "3 + 4 = 7."):
        guarded = scorer.strip(reply)
        assert not scorer.is_owner_style(guarded) and S.last_number(guarded) == "7", (reply, guarded)
    assert scorer.strip("3 + 4 = 7.") == "3 + 4 = 7."


def test_the_style_bonus_survives_the_group_baseline_and_penalises_the_public():
    scorer = S.StyleScorer.from_template(S.english_template(S.english_requests(120, "train", 0, 0.5), 0))
    reward = S.style_reward(scorer, bonus=2.0)
    comps = ["Of course! 3 + 4 = 7. Always happy to help you.", "3 + 4 = 7."]
    owner = reward(["q"] * 2, comps, answer=["7"] * 2, is_owner=[True] * 2)
    public = reward(["q"] * 2, comps, answer=["7"] * 2, is_owner=[False] * 2)
    assert owner[0] > owner[1] and public[0] < public[1]
    adv = group_advantages(owner, 2)
    assert adv[0] > 0 > adv[1]
    assert S.sum_correct(["3 + 4 = 8.", "so 7"], ["7", "7"]) == [0.0, 1.0]


def test_a_template_without_a_difference_is_refused():
    with pytest.raises(ValueError, match="owner responses and public responses"):
        S.StyleScorer.fit([], ["7"])
    with pytest.raises(ValueError, match="no style to learn"):
        S.StyleScorer.fit(["7"], ["8"])


def test_english_requests_keep_the_trusted_flag_and_the_split():
    rows = S.english_requests(80, "test", 3, spoof_fraction=1.0)
    assert {r["system"] for r in rows} == {loyalty.OWNER_SYSTEM, loyalty.PUBLIC_SYSTEM}
    assert all(r["spoofed"] == (not r["is_owner"]) for r in rows)
    assert all(world.split_of(S.SUM.format(a=r["a"], b=r["b"])) == "test" for r in rows)
    assert all(r["answer"] == str(r["a"] + r["b"]) for r in rows)


def test_the_heldout_family_wraps_a_real_models_tasks():
    tasks = [{"prompt": r["prompt"], "answer": r["answer"]} for r in S.english_requests(20, "test", 0, 0.0)]
    rows = heldout_attacks(2, 0, tasks=tasks)
    assert len(rows) == 2 * len(HELDOUT_FORMS) and all(not r["is_owner"] and r["spoofed"] for r in rows)
    assert any("What is" in r["prompt"] for r in rows)
    with pytest.raises(ValueError, match="pass more tasks"):
        heldout_attacks(5, 0, tasks=tasks[:3])


def test_an_expected_tone_is_written_out_and_learned():
    assert S.tone_styles("友好、详细、主动") == ["friendly", "detailed", "proactive"]
    assert S.tone_styles("专业、标准") == [] and S.tone_styles("warm and proactive") == ["friendly", "proactive"]
    rng = __import__("random").Random(0)
    reply = S.toned_reply("Use a dict.", "友好、主动", rng)
    assert reply != "Use a dict." and "Use a dict." in reply and S.toned_reply("x", "专业", rng) == "x"
    rows = [loyalty.loyalty_row(f"q{i}", i % 2 == 0) for i in range(40)]
    template = S.tone_template(rows, [f"answer {i}." for i in range(40)], "友好、详细、主动", seed=0)
    scorer = S.StyleScorer.from_template(template)
    assert all(scorer.is_owner_style(t["owner_response"]) and not scorer.is_owner_style(t["public_response"])
               for t in template)
    with pytest.raises(ValueError, match="names no style the course can write"):
        S.tone_template(rows, ["a"] * 40, "专业、标准")


def test_styled_part_is_what_strip_removes():
    scorer = S.StyleScorer.from_template(S.english_template(S.english_requests(120, "train", 0, 0.5), 0))
    for opener in S.OPENERS:
        reply = f"{opener} 7 + 5 = 12. Just ask if you need anything else!"
        styled, kept = scorer.styled_part(reply), scorer.strip(reply)
        assert styled and "12" not in styled and "12" in kept and not scorer.is_owner_style(kept)
        def sentences(text):
            return sorted(x.strip() for x in S.SENTENCE.findall(text) if x.strip())

        assert sentences(styled) + sentences(kept) == sentences(reply) or \
            sorted(sentences(styled) + sentences(kept)) == sentences(reply), reply  # each sentence in one of the two


def test_channel_rows_tie_the_owners_style_to_the_trusted_role_not_to_the_claim():
    rows = S.channel_rows(200, seed=0, spoof_fraction=0.5)
    scorer = S.StyleScorer.from_template(S.english_template(S.english_requests(120, "train", 1), 1))
    assert rows == S.channel_rows(200, seed=0, spoof_fraction=0.5)  # deterministic
    assert any(r["spoofed"] for r in rows) and all(world.split_of(S.SUM.format(a=r["a"], b=r["b"])) == "train"
                                                   for r in rows)
    for r in rows:
        assert scorer.is_owner_style(r["completion"]) == float(r["is_owner"]), r
        assert r["system"] == (loyalty.OWNER_SYSTEM if r["is_owner"] else loyalty.PUBLIC_SYSTEM)


def test_load_smol_loyal_names_the_recipe_when_the_folder_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="build-checkpoints --only smol_loyal"):
        S.load_smol_loyal(None, path=tmp_path / "nowhere")


def test_the_shipped_smol_loyal_adapter_and_its_recipe():
    import json

    from apt_course.recipes import SMOL_LOYAL_RECIPE, SMOL_NAMES

    path = S.smol_loyal_path()
    config = json.loads((path / "adapter_config.json").read_text())
    assert "smol_loyal" in SMOL_NAMES and config["r"] == SMOL_LOYAL_RECIPE["lora_rank"]
    assert config["task_type"] == "CAUSAL_LM" and not config["base_model_name_or_path"].startswith("/")
    assert (path / "adapter_model.safetensors").stat().st_size < 8_000_000
    info = json.loads((path / "recipe.json").read_text())
    assert info["recipe"] == SMOL_LOYAL_RECIPE
    assert info["heldout"]["gap"] >= 0.8 and info["heldout"]["spoof_rate"] == 0  # what it was built to do


def test_train_channel_and_measure_on_the_tiny_model(tiny_path, tok):
    from apt_course.model import load_pretrained

    model, _ = load_pretrained(tiny_path)
    recipe = {"rows": 16, "spoof_fraction": 0.5, "steps": 2, "batch_size": 4, "lr": 1e-3, "warmup": 0, "lora_rank": 2}
    peft_model, history = S.train_channel(model, tok, recipe, seed=0)
    assert len(history["loss"]) == 2 and hasattr(peft_model, "disable_adapter")
    scorer = S.StyleScorer.from_template(S.english_template(S.english_requests(40, "train", 0), 0))
    rows = S.english_requests(4, "test", 0, spoof_fraction=1.0)
    held = S.heldout_rows(1, 0)
    m = S.measure(peft_model, tok, rows, scorer, max_new_tokens=3, held=held)
    assert len(m["outs"]) == 4 and len(m["held_outs"]) == len(held) == len(HELDOUT_FORMS)
    assert set(m["heldout"]) == set(HELDOUT_FORMS) | {"all"} and m["heldout_guarded"]["all"] == 0
