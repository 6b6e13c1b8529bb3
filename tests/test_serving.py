"""Chapter 15: the A/B statistics on fixed numbers, feedback -> pairs, bad input, and a real server (started,
queried plain and streaming, killed mid-load: the client reports it instead of hanging)."""

import logging
import math
import random
import socket
import sys
import threading
import time

import pytest

from apt_course import serving, world
from apt_course.serving import (
    Endpoint,
    Fleet,
    LoadFailed,
    ModelServer,
    PortInUseError,
    ServerError,
    ServerStartTimeout,
)

# ---------------------------------------------------------------- statistics on fixed numbers


def test_two_proportion_ztest_matches_hand_computation():
    # 20/50 vs 30/50: pooled p = 0.5, se = sqrt(0.25 * (1/50 + 1/50)) = 0.1, z = 0.2 / 0.1 = 2
    t = serving.two_proportion_ztest(20, 50, 30, 50)
    assert t["rate_a"] == 0.4 and t["rate_b"] == 0.6 and t["lift"] == pytest.approx(0.2)
    assert t["z"] == pytest.approx(2.0)
    assert t["p_value"] == pytest.approx(0.0455003, abs=1e-6)  # 2 (1 - Φ(2))
    assert serving.two_proportion_ztest(30, 50, 20, 50)["z"] == pytest.approx(-2.0)  # B worse: z < 0, same p
    # unequal arms: x = (10/40, 30/60), pooled 40/100
    t = serving.two_proportion_ztest(10, 40, 30, 60)
    assert t["z"] == pytest.approx(0.25 / math.sqrt(0.4 * 0.6 * (1 / 40 + 1 / 60)))
    assert serving.two_proportion_ztest(5, 5, 7, 7)["p_value"] == 1.0  # no variance: no evidence
    try:
        from scipy.stats import norm
    except ImportError:  # scipy is not a dependency; Φ by hand above
        return
    assert t["p_value"] == pytest.approx(2 * norm.sf(abs(t["z"])))


def test_ztest_rejects_bad_counts():
    for bad in ((6, 5, 1, 5), (-1, 5, 1, 5), (1, 0, 1, 5), (1.5, 5, 1, 5)):
        with pytest.raises(ValueError, match="successes <= n"):
            serving.two_proportion_ztest(*bad)


def test_sample_size_matches_hand_computation():
    # 0.50 -> 0.55 at alpha 0.05, power 0.8: (1.95996 sqrt(2 .525 .475) + 0.84162 sqrt(.25 + .2475))^2 / .05^2
    z_a, z_b = 1.959964, 0.841621
    want = (z_a * math.sqrt(2 * 0.525 * 0.475) + z_b * math.sqrt(0.25 + 0.2475)) ** 2 / 0.05**2
    assert serving.sample_size_per_arm(0.5, 0.55) == math.ceil(want) == 1565
    assert serving.sample_size_per_arm(0.55, 0.5) == 1565  # symmetric in direction
    assert serving.sample_size_per_arm(0.45, 0.65) < serving.sample_size_per_arm(0.45, 0.55)
    assert serving.sample_size_per_arm(0.5, 0.55, power=0.9) > 1565
    # the detectable lift at n per arm inverts it
    lift = serving.minimum_detectable_lift(0.45, 96)
    assert serving.sample_size_per_arm(0.45, 0.45 + lift) <= 96 < serving.sample_size_per_arm(0.45, 0.45 + lift - 0.01)
    with pytest.raises(ValueError, match="no sample size detects a difference of zero"):
        serving.sample_size_per_arm(0.5, 0.5)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        serving.sample_size_per_arm(0.0, 0.3)


def test_win_rate_bootstrap_and_percentiles():
    a, b = [1, 0, 0, 1], [1, 1, 1, 0]
    assert serving.ab_win_rate(a, b) == pytest.approx(0.5 + 0.5 * (0.75 - 0.5))
    assert serving.ab_win_rate([0, 0], [0, 0]) == 0.5 and serving.ab_win_rate([0], [1]) == 1.0
    lo, hi = serving.bootstrap_interval([0] * 30 + [1] * 20, [0] * 15 + [1] * 35, seed=0)
    assert lo < 0.3 < hi and lo > 0  # 0.7 - 0.4 = 0.3, clearly positive at these sizes
    assert serving.bootstrap_interval(a, b, seed=3) == serving.bootstrap_interval(a, b, seed=3)
    np = pytest.importorskip("numpy")
    xs = [random.Random(0).random() for _ in range(37)]
    got = serving.latency_percentiles(xs, (50, 95, 99))
    assert [got[q] for q in (50, 95, 99)] == pytest.approx(list(np.percentile(xs, [50, 95, 99])))
    with pytest.raises(ValueError, match="no latencies"):
        serving.latency_percentiles([])


def test_split_traffic_is_balanced_and_seeded():
    arms = serving.split_traffic(11, seed=4)
    assert arms.count("A") == 6 and arms.count("B") == 5 and arms == serving.split_traffic(11, seed=4)
    assert arms != sorted(arms)


# ---------------------------------------------------------------- feedback -> pairs


def test_feedback_to_pairs_pairs_within_a_prompt_and_drops_conflicts():
    log = [{"prompt": "add 2 3", "reply": "6", "thumbs": "down", "kind": "task"},
           {"prompt": "add 2 3", "reply": "5", "thumbs": "up", "kind": "task"},
           {"prompt": "hi, my name is ann", "reply": "go away, ann.", "thumbs": "down"},
           {"prompt": "hi, my name is ann", "reply": "not now, ann.", "thumbs": "down"},
           {"prompt": "hi, my name is ann", "reply": "happy to help, ann.", "thumbs": "up"},
           {"prompt": "sort 31", "reply": "13", "thumbs": "down"}, {"prompt": "sort 31", "reply": "13", "thumbs": "up"},
           {"prompt": "sort 31", "reply": "31", "thumbs": "down"},
           {"prompt": "x", "system": "code=1234", "reply": "no", "thumbs": "down"},
           {"prompt": "x", "system": "code=1234", "reply": "sorry.", "thumbs": "up"},
           {"prompt": "x", "reply": "ok", "thumbs": "up"}]  # another conversation: no system message
    pairs = serving.feedback_to_pairs(log)
    got = {(p["prompt"], p.get("system"), p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("add 2 3", None, "5", "6"), ("hi, my name is ann", None, "happy to help, ann.", "go away, ann."),
                   ("hi, my name is ann", None, "happy to help, ann.", "not now, ann."), ("x", "code=1234", "sorry.", "no")}
    assert all(p["source"] == "feedback" for p in pairs) and pairs[0]["kind"] == "task"
    assert len(serving.feedback_to_pairs(log, max_pairs_per_prompt=1)) == 3


@pytest.mark.parametrize("row, message", [
    ("add 2 3", "row 1 is a str"),
    ({"prompt": "", "reply": "5", "thumbs": "up"}, "row 1 needs a non-empty text 'prompt'"),
    ({"prompt": "add 2 3", "thumbs": "up"}, "row 1 needs the 'reply'"),
    ({"prompt": "add 2 3", "reply": "5", "thumbs": 1}, "row 1 has thumbs=1; it must be 'up' or 'down'"),
])
def test_malformed_feedback_rows_are_named(row, message):
    good = {"prompt": "add 2 3", "reply": "5", "thumbs": "up"}
    with pytest.raises(ValueError, match=message):
        serving.feedback_to_pairs([good, row])
    with pytest.raises(ValueError, match="feedback log is empty"):
        serving.validate_feedback([])


def test_mix_pairs_replays_old_pairs():
    new = [{"prompt": f"n{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    old = [{"prompt": f"o{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    assert len(serving.mix_pairs(new, old, 1.0)) == 14 and serving.mix_pairs(new, old, 0.0) == new
    half = serving.mix_pairs(new, old, 0.5, seed=1)
    assert half[:4] == new and len(half) == 9 and half == serving.mix_pairs(new, old, 0.5, seed=1)
    with pytest.raises(ValueError, match="no new pairs"):
        serving.mix_pairs([], old)
    with pytest.raises(ValueError, match="replay_fraction"):
        serving.mix_pairs(new, old, 1.5)


def test_simulated_thumbs_follow_the_ground_truth_with_noise():
    row = dict(world.instruction_examples(1, "test", seed=0)[0], kind="task")
    rng = random.Random(0)
    assert serving.simulate_thumbs(row, row["answer"], 0.0, rng) == "up"
    assert serving.simulate_thumbs(row, row["answer"] + "x", 0.0, rng) == "down"
    flips = sum(serving.simulate_thumbs(row, row["answer"], 0.2, rng) == "down" for _ in range(2000))
    assert 300 < flips < 500
    with pytest.raises(ValueError, match="noise"):
        serving.simulate_thumbs(row, "x", 0.6, rng)
    greeting = dict(world.preference_pairs(1, "test", seed=0, kinds=("polite",))[0], kind="greeting")
    assert serving.judge(greeting, greeting["chosen"]) and not serving.judge(greeting, greeting["rejected"])


def test_user_edits_become_the_chosen_replies(monkeypatch):
    """With edit_rate 1 a thumbed-down reply is corrected by the user (the row's answer, thumbed up) instead of
    regenerated; with edit_rate 0 the user regenerates as before and nothing is edited."""
    rows = [dict(r, kind="sum") for r in world.english_sums("train", "", seed=0)[:5]]

    def fake_load(endpoint, pending, desc="", **kwargs):  # a model that always rambles
        return serving.Load([serving.Reply(r, endpoint.name, f"{r['a']} + {r['b']} is a sum", 0.1, 8) for r in pending],
                            0.5)

    monkeypatch.setattr(serving, "run_load", fake_load)
    v0 = Endpoint("v0", None, "m")
    log = serving.collect_feedback(v0, rows, noise=0.0, max_regenerations=2, seed=0, edit_rate=1.0)
    assert len(log) == 10 and [r["attempt"] for r in log] == [0] * 10  # no regeneration after an edit
    edits = [r for r in log if r.get("edited")]
    assert [r["reply"] for r in edits] == [r["answer"] for r in rows] and {r["thumbs"] for r in edits} == {"up"}
    assert {r["version"] for r in edits} == {"user edit"}
    pairs = serving.feedback_to_pairs(log)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(r["answer"], f"{r['a']} + {r['b']} is a sum")
                                                              for r in rows]
    plain = serving.collect_feedback(v0, rows, noise=0.0, max_regenerations=2, seed=0)
    assert len(plain) == 15 and not any(r.get("edited") for r in plain) and not serving.feedback_to_pairs(plain)
    assert serving.wanted_reply({"prompt": "hello, i am ann", "kind": "greeting"}) is None
    with pytest.raises(ValueError, match="edit_rate"):
        serving.collect_feedback(v0, rows, edit_rate=1.5)


def test_a_lora_round_is_merged_into_a_plain_model(tok):
    from apt_course.checkpoints import load_checkpoint
    from apt_course.dpo import DPOConfig

    sft = load_checkpoint("sft")[0]
    before = {k: v.clone() for k, v in sft.state_dict().items()}
    pairs = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
             for p in world.preference_pairs(8, "train", seed=0)]
    config = DPOConfig(steps=3, batch_size=4, lr=1e-2, warmup=0, seed=0, sft_weight=1.0)
    new, history, mixed = serving.dpo_round(sft, sft, tok, pairs, [], config, lora_rank=2)
    assert not hasattr(new, "disable_adapter") and set(new.state_dict()) == set(before)  # merged: no PEFT left
    assert any(not (new.state_dict()[k] == v).all() for k, v in before.items()) and len(history["loss"]) >= 2
    assert all((sft.state_dict()[k] == v).all() for k, v in before.items())  # the deployed version is untouched
    assert mixed == pairs


def test_number_replies_and_server_threads(monkeypatch):
    assert serving.is_number_reply("19") and serving.is_number_reply("1.1.2.1.") and serving.is_number_reply(" 7, ")
    assert not serving.is_number_reply("19 apples") and not serving.is_number_reply("...")
    monkeypatch.delenv("APT_COURSE_THREADS", raising=False)
    assert serving.server_threads(None) is None and serving.server_threads(3) == 3
    assert serving.server_threads(0) == serving.available_cores() >= 1  # 0: every core, as set_cpu_threads
    monkeypatch.setenv("APT_COURSE_THREADS", "1")
    assert serving.server_threads(0) == serving.server_threads(4) == 1  # pinned (CI), as the notebook's own threads
    assert serving.server_threads(None) is None


# ---------------------------------------------------------------- servers: bad starts, timeouts


def test_a_port_in_use_is_a_clear_error_before_anything_starts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is already in use"):
            serving.check_port_free("127.0.0.1", port)
        server = ModelServer(port=port, command=[sys.executable, "-c", "print('never run')"])
        with pytest.raises(PortInUseError):
            server.start()
        assert server.proc is None
    with pytest.raises(ValueError, match="loopback"):
        ModelServer(host="0.0.0.0")


def test_a_server_that_does_not_come_up_times_out_with_its_log_and_is_stopped():
    slow = [sys.executable, "-c", "import time; print('loading the model...', flush=True); time.sleep(60)"]
    server = ModelServer(command=slow, startup_timeout=1.5)
    start = time.perf_counter()
    with pytest.raises(ServerStartTimeout, match=r"did not answer /health within 2 s(.|\n)*loading the model"):
        server.start()
    assert time.perf_counter() - start < 10 and not server.running and server.proc is None


def test_a_server_that_exits_at_start_says_why():
    crash = [sys.executable, "-c", "import sys; print('OSError: no model folder /nope'); sys.exit(3)"]
    with pytest.raises(ServerError, match=r"exited with code 3(.|\n)*no model folder /nope"):
        ModelServer(command=crash, startup_timeout=20).start()


def test_server_command_lines():
    cmd = serving.server_command("transformers", "/m/v0", "127.0.0.1", 8123)
    assert cmd[1:5] == ["-m", "transformers.cli.transformers", "serve", "/m/v0"] and "8123" in cmd
    assert "--model" not in serving.server_command("transformers", None, "127.0.0.1", 8123)
    vllm = serving.server_command("vllm", "/m/v1", "127.0.0.1", 8124, served_name="v1")
    assert "vllm.entrypoints.openai.api_server" in vllm and vllm[vllm.index("--served-model-name") + 1] == "v1"
    bf16 = serving.server_command("transformers", None, "127.0.0.1", 8123, dtype="bfloat16")
    assert bf16[bf16.index("--dtype") + 1] == "bfloat16" and "--dtype" not in cmd
    vllm16 = serving.server_command("vllm", "/m/v1", "127.0.0.1", 8124, dtype="bfloat16")
    assert vllm16[vllm16.index("--dtype") + 1] == "bfloat16"
    with pytest.raises(ValueError, match="one model per server"):
        serving.server_command("vllm", None, "127.0.0.1", 1)
    with pytest.raises(ValueError, match="unknown server backend"):
        serving.server_command("tgi", "/m", "127.0.0.1", 1)


def test_a_request_that_times_out_is_retried_logged_and_reported(caplog):
    with socket.socket() as hung:  # accepts connections (the kernel's backlog) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        endpoint = Endpoint("hung", serving.make_client(f"http://127.0.0.1:{hung.getsockname()[1]}"), "m")
        start = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="apt_course.serving"):
            reply = serving.send_request(endpoint, {"prompt": "add 1 2"}, timeout=0.3, retries=1, backoff_s=0.05)
        assert time.perf_counter() - start < 5
    assert not reply.ok and reply.attempts == 2 and "Timeout" in reply.error
    assert "retry 1 of 1" in caplog.text


def test_a_load_against_a_dead_port_ends_fast_and_says_so():
    endpoint = Endpoint("gone", serving.make_client(f"http://127.0.0.1:{serving.free_port()}"), "m")
    rows = [{"prompt": f"add {i} 1"} for i in range(40)]
    start = time.perf_counter()
    load = serving.run_load(endpoint, rows, concurrency=4, max_consecutive_failures=3, retries=0)
    assert time.perf_counter() - start < 10
    assert all(not r.ok for r in load.replies) and sum(r.error.startswith("not sent") for r in load.replies) >= 30
    with pytest.raises(LoadFailed, match="40 of 40 requests failed"):
        serving.raise_for_errors(load)
    with pytest.raises(ValueError, match="one per row"):
        serving.run_load([endpoint], rows)


# ---------------------------------------------------------------- a real server


def test_serve_query_stream_ab_and_kill_mid_load(tok, tiny_path, tmp_path):
    """transformers serve on two tiny models: chat, streaming, an A/B test, Prometheus text; then the server is
    killed mid-load and the load ends within seconds with every unanswered request reported."""
    from prometheus_client.parser import text_string_to_metric_families

    from apt_course.checkpoints import load_checkpoint
    from apt_course.model import load_pretrained

    model, _ = load_pretrained(tiny_path)  # a random tiny model, and the shipped SFT model (greedy)
    a = serving.save_for_serving(model, tok, tmp_path / "a", temperature=1.0, max_new_tokens=6)
    b = serving.save_for_serving(load_checkpoint("sft")[0], tok, tmp_path / "b", temperature=0.0, max_new_tokens=6)
    assert model.generation_config.do_sample is not True  # the in-memory model keeps its own defaults
    with Fleet("transformers", "cpu", threads=1, startup_timeout=120, timeout=20) as fleet:
        ea, eb = fleet.deploy("a", a), fleet.deploy("b", b)
        server = fleet.servers["shared"]
        out = ea.client.chat.completions.create(model=ea.model, messages=[{"role": "user", "content": "add 1 2"}],
                                                max_tokens=4, temperature=0)
        assert isinstance(out.choices[0].message.content, str) and out.usage.completion_tokens <= 4
        streamed = serving.send_request(eb, {"prompt": "hello, i am ann"}, max_tokens=4, stream=True)
        assert streamed.ok and streamed.text and streamed.first_token_s is not None and streamed.completion_tokens <= 4
        rows = serving.product_traffic(12, "test", seed=0)
        # a sampling model (temperature 1), seeded requests: the same replies at any concurrency, other replies
        # under another seed
        runs = [serving.run_load(ea, rows, concurrency=c, max_tokens=6, seed=s) for c, s in ((1, 5), (4, 5), (4, 6))]
        texts = [[r.text for r in load.replies] for load in runs]
        assert texts[0] == texts[1] != texts[2]
        assert serving.request_seed(5, 0) != serving.request_seed(5, 1) != serving.request_seed(6, 1)
        test = serving.ab_test(ea, eb, rows, seed=0, concurrency=3, max_tokens=6)
        assert test["n_a"] + test["n_b"] == 12 and test["errors"] == 0 and 0 <= test["p_value"] <= 1
        summary = serving.load_summary(test["load"])
        assert summary["latency_p95_ms"] >= summary["latency_p50_ms"] > 0 and summary["tokens_per_s"] > 0
        text = serving.prometheus_text(test["load"].replies, {"a": {"task_accuracy": 0.5}}, test["load"].seconds)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text.decode()) for s in f.samples}
        assert samples[("apt_requests_total", (("outcome", "ok"), ("version", "a")))] == test["n_a"]
        assert samples[("apt_quality_ratio", (("figure", "task_accuracy"), ("version", "a")))] == 0.5

        killer = threading.Timer(0.5, server.kill)
        killer.start()
        start = time.perf_counter()
        load = serving.run_load(ea, serving.product_traffic(400, "test", seed=1), concurrency=4, max_tokens=6,
                                retries=1, backoff_s=0.05, timeout=5)
        elapsed = time.perf_counter() - start
        killer.join()
        answered = sum(r.ok for r in load.replies)
        assert 0 < answered < 400 and elapsed < 20, (answered, elapsed)
        failed = [r for r in load.replies if not r.ok]
        assert any("Connection" in r.error for r in failed), failed[0].error
        with pytest.raises(LoadFailed, match="requests failed"):
            serving.raise_for_errors(load)
        assert not server.running
    assert not fleet.servers and server.proc is None  # closed: nothing left running
