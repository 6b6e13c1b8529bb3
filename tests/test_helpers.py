import json
import math
import socket
import subprocess
import sys

import pytest
import torch

from apt_course.plots import before_after, smooth
from apt_course.results import ResultsRecorder, format_report, load_results
from apt_course.training import NonFiniteError, make_optimizer, optimizer_step
from apt_course.utils import NetworkBlockedError, bf16_supported, get_device, set_seed


def test_recorder_writes_the_documented_record(tmp_path):
    rec = ResultsRecorder("ch99_demo", directory=tmp_path)
    path = rec.save(acc_before=0.1, acc_after=0.9)
    record = json.loads(path.read_text())
    assert path.name == "ch99_demo.json"
    assert record["chapter"] == "ch99_demo" and record["metrics"] == {"acc_before": 0.1, "acc_after": 0.9}
    assert record["seconds"] >= 0
    assert "acc_after=0.9" in format_report(load_results(tmp_path))


def test_recorder_refuses_nan_and_non_numbers(tmp_path):
    rec = ResultsRecorder("ch99_demo", directory=tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        rec.log(acc=math.nan)
    with pytest.raises(TypeError, match="must be a number"):
        rec.log(acc="high")
    with pytest.raises(ValueError, match="file stem"):
        ResultsRecorder("ch 00")


def test_report_command_prints_every_chapter(tmp_path):
    ResultsRecorder("ch00_x", directory=tmp_path).save(loss=1.5)
    ResultsRecorder("ch01_y", directory=tmp_path).save(err=0.0)
    out = subprocess.run([sys.executable, "-m", "apt_course", "report", "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "ch00_x" in out and "ch01_y" in out and "loss=1.5" in out


def test_seeding_repeats_and_device_is_cpu_here():
    set_seed(3)
    a = torch.rand(3)
    set_seed(3)
    assert torch.equal(a, torch.rand(3))
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    want = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    assert get_device(verbose=False).type == want  # CUDA, then MPS, then CPU
    assert get_device("cpu", verbose=False).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            get_device("cuda", verbose=False)
    with pytest.raises(ValueError, match="Unknown device"):
        get_device("tpu")


def test_network_is_blocked_in_tests():
    with socket.socket() as s, pytest.raises(NetworkBlockedError, match="blocked"):
        s.connect(("18.239.50.80", 443))  # an address of huggingface.co: refused before any packet leaves


def test_schedule_warms_up_then_decays():
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, lr=1.0, steps=10, warmup=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] < lrs[2] and min(lrs) >= 0.1
    with pytest.raises(ValueError, match="lr > 0"):
        make_optimizer(model, lr=0, steps=10)


def test_smooth_and_before_after():
    assert smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    table = before_after({"acc": 0.2}, {"acc": 0.9})
    assert table.loc["acc", "change"] == pytest.approx(0.7)


def test_bf16_only_on_gpus_with_native_support(monkeypatch):
    assert not bf16_supported("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):  # T4, A100, H100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert bf16_supported("cuda") is native


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_training_and_keeps_the_weights(poison):
    model = torch.nn.Linear(3, 1)
    opt, sched = make_optimizer(model, lr=0.1, steps=10)
    x = torch.ones(2, 3)
    optimizer_step(model(x).pow(2).mean(), model, opt, sched)  # update 0 is fine
    before = [p.detach().clone() for p in model.parameters()]
    if poison == "loss":
        loss = model(x).mean() * float("nan")
    else:  # a finite loss whose gradient overflows: sqrt at 0 has an infinite derivative
        loss = (model(x) - model(x).detach()).abs().sqrt().mean()
    with pytest.raises(NonFiniteError, match=r"update 1: the (loss|gradient norm) is (nan|inf).*lower learning rate"):
        optimizer_step(loss, model, opt, sched)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p) and torch.isfinite(p).all()


def test_a_real_model_profile_records_beside_the_tiny_figures(tmp_path):
    ResultsRecorder("ch99_demo", directory=tmp_path).save(acc=0.5)
    ResultsRecorder("ch99_demo", directory=tmp_path, profile="smol").save(acc=0.25)
    records = {r.get("profile", "tiny"): r["metrics"]["acc"] for r in load_results(tmp_path)}
    assert records == {"tiny": 0.5, "smol": 0.25}
    assert "ch99_demo [smol]" in format_report(load_results(tmp_path))
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temporary file left


def test_sweep_ranges_quote_every_seed(tmp_path):
    from apt_course.results import sweep_ranges

    rows = [{"chapter": "ch11_loyalty", "seed": s, "status": "ok", "metrics": {"gap": g, "spoof": 0.0}}
            for s, g in ((0, 0.9), (1, 0.7), (2, 1.0))]
    rows += [{"chapter": "ch11_loyalty", "seed": 3, "status": "failed", "metrics": {"gap": 0.0}},
             {"chapter": "ch12_storm", "seed": 0, "status": "ok", "metrics": {"gap": 5.0}}]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(rows))
    assert sweep_ranges("ch11_loyalty", ["gap", "spoof", "absent"], path=path) == {
        "gap": (0.7, 1.0, [0, 1, 2]), "spoof": (0.0, 0.0, [0, 1, 2])}
    assert sweep_ranges("ch11_loyalty", ["gap"], path=tmp_path / "missing.json") == {}
    assert sweep_ranges("ch11_loyalty", ["hardened_gap"])["hardened_gap"][2]  # the committed sweep has seeds


def test_check_floors_prints_each_check_and_names_every_failure(capsys):
    from apt_course.results import check_floors

    assert check_floors({"gap": (0.6, ">=", 0.23), "spoof rate": (0.0, "==", 0), "drop": (0.04, "<=", 0.05)}) == ""
    out = capsys.readouterr().out
    assert out.count(" ok") == 3 and "gap" in out and "FAILED" not in out
    message = check_floors({"gap": (0.1, ">=", 0.23), "spoof rate": (0.01, "==", 0), "drop": (0.04, "<=", 0.05)},
                           source="FINDINGS.md, ch11")
    assert "2 of 3" in message and "gap: 0.1" in message and "spoof rate: 0.01" in message and "drop" not in message
    assert "FINDINGS.md, ch11" in message and capsys.readouterr().out.count("FAILED") == 2
    with pytest.raises(ValueError, match="unknown comparison"):
        check_floors({"gap": (0.6, "=>", 0.23)})
    # a difference that meets its bound but for float rounding passes; a real shortfall does not
    assert check_floors({"gain": (0.49 - 0.29, ">=", 0.20), "drop": (0.3 - 0.1, "<=", 0.2)}) == ""
    assert check_floors({"gain": (0.1999, ">=", 0.20)}) != ""
