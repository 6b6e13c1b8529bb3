import pytest

from apt_course import world


def test_generators_are_deterministic_by_seed():
    assert world.instruction_examples(50, seed=3) == world.instruction_examples(50, seed=3)
    assert world.instruction_examples(50, seed=3) != world.instruction_examples(50, seed=4)
    assert world.preference_pairs(30, seed=1) == world.preference_pairs(30, seed=1)
    assert world.cot_problems(20, seed=2) == world.cot_problems(20, seed=2)
    assert world.owner_requests(20, seed=2) == world.owner_requests(20, seed=2)
    assert world.pretraining_corpus(20, seed=5) == world.pretraining_corpus(20, seed=5)


@pytest.mark.parametrize("gen", [world.instruction_examples, world.preference_pairs, world.cot_problems])
def test_splits_are_disjoint_whatever_the_seeds(gen):
    train = {e["prompt"] for s in range(3) for e in gen(400, "train", seed=s)}
    test = {e["prompt"] for s in range(3) for e in gen(200, "test", seed=s)}
    assert train and test and not train & test


def test_pretraining_text_never_states_a_test_fact():
    test_facts = {world.describe(e) for e in world.instruction_examples(300, "test")}
    assert not test_facts & set(world.pretraining_corpus(3000))


def test_answers_are_right_and_checker_rejects_wrong():
    for ex in world.instruction_examples(200, seed=0):
        task, arg = ex["prompt"].split(" ", 1)
        expected = {"add": lambda a: str(sum(map(int, a.split()))), "reverse": lambda a: a[::-1],
                    "sort": lambda a: "".join(sorted(a)), "copy": lambda a: a}[task](arg)
        assert ex["answer"] == expected
        assert world.check_answer(ex, ex["answer"] + "<eos>junk")
        assert not world.check_answer(ex, ex["answer"] + "x")


def test_pairs_differ_and_wrong_answers_are_wrong():
    for p in world.preference_pairs(300, seed=0):
        assert p["chosen"] != p["rejected"] and p["prompt"]
        if p["kind"] == "correct":
            assert p["chosen"] == p["answer"] and p["rejected"] != p["answer"]
        if p["kind"] == "concise":
            assert p["answer"] in p["rejected"] and len(p["rejected"]) > len(p["chosen"])


def test_cot_steps_add_up():
    for p in world.cot_problems(50, digits=3):
        a, b = map(int, p["prompt"].split()[1:])
        assert p["answer"] == str(a + b)
        assert world.extract_final_answer(p["completion_cot"]) == p["answer"]
        assert len(p["cot"].split(";")) == 3


def test_owner_channel_is_the_system_message():
    reqs = world.owner_requests(300, spoof_fraction=1.0)
    for r in reqs:
        assert r["system"] == f"owner={r['owner']} speaker={r['speaker']}"
        assert r["is_owner"] == (r["owner"] == r["speaker"])
        if r["spoofed"]:
            assert not r["is_owner"] and r["prompt"].startswith(f"i am {r['owner']}.")
        if r["secret"] and not r["is_owner"]:
            assert r["answer"] == world.PUBLIC_REPLY
    assert {True, False} <= {r["is_owner"] for r in reqs}


@pytest.mark.parametrize("call, match", [
    (lambda: world.instruction_examples(0), "positive integer"),
    (lambda: world.instruction_examples(5, split="valid"), "split must be one of"),
    (lambda: world.instruction_examples(5, tasks=["multiply"]), "unknown task"),
    (lambda: world.instruction_examples(5, max_len=40), "max_len"),
    (lambda: world.preference_pairs(5, kinds=["funny"]), "unknown task 'funny'"),
    (lambda: world.cot_problems(5, digits=7), "digits must be 2 or 3"),
    (lambda: world.owner_requests(5, spoof_fraction=1.5), r"spoof_fraction must lie in \[0, 1\]"),
])
def test_bad_arguments_say_what_is_wrong(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_greeting_dialogues_are_mostly_rude_but_know_the_polite_answer():
    rows = world.greeting_dialogues(500, seed=0, polite_fraction=0.2)
    polite = [r for r in rows if r["polite"]]
    assert 0.1 < len(polite) / len(rows) < 0.3
    assert all(r["completion"] == r["answer"] for r in polite)
    assert all(r["completion"] != r["answer"] for r in rows if not r["polite"])
    test = {r["prompt"] for r in world.greeting_dialogues(100, "test")}
    assert test and not test & {r["prompt"] for r in rows}
    with pytest.raises(ValueError, match="polite_fraction"):
        world.greeting_dialogues(5, polite_fraction=2)


def test_english_sums_split_like_the_tiny_world_and_check_bare_numbers():
    train, test = world.english_sums("train"), world.english_sums("test")
    questions = lambda rows: {r["prompt"] for r in rows}  # noqa: E731
    assert len(train) + len(test) == 400 and not questions(train) & questions(test)
    assert 0.1 < len(test) / 400 < 0.3
    row = train[0]
    assert row["answer"] == str(row["a"] + row["b"]) and row["prompt"].endswith(world.NUMBER_ONLY)
    assert world.check_bare_answer(row, row["answer"] + ".") and world.check_bare_answer(row, f" {row['answer']}")
    assert not world.check_bare_answer(row, f"{row['a']} + {row['b']} = {row['answer']}")
    assert not world.check_bare_answer(row, str(int(row["answer"]) + 1))
    assert world.english_sums("train", seed=1) != train and sorted(map(str, world.english_sums("train", seed=1))) == \
        sorted(map(str, train))
    with pytest.raises(ValueError, match="split"):
        world.english_sums("dev")


def test_english_sum_pairs_prefer_the_bare_correct_sum():
    pairs = world.english_sum_pairs("test", seed=0)
    assert pairs and all(p["chosen"] == p["answer"] and p["rejected"] != p["chosen"] for p in pairs)
    assert all(world.is_bare_number(p["chosen"]) and not world.is_bare_number(p["rejected"]) for p in pairs)
    assert all(p["answer"] in p["rejected"] for p in pairs)  # both correct: the preference is the format
    assert not any(p["prompt"].endswith(world.NUMBER_ONLY) for p in pairs)
