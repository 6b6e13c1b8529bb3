"""Chapter 13 exercises: a history file never half-written, resuming a pipeline, budgets in epochs."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from unittest import mock

from . import exercise, expect


def _need_function(fn, name):
    expect(callable(fn), f"pass your function itself (e.g. `{name}`), not {type(fn).__name__}")


@exercise("ch13.atomic_write", "write the history so that a crash never leaves half a file")
def check_atomic_write(fn):
    _need_function(fn, "save_json")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "training_history.json"
        fn(path, {"stages": [1]})
        expect(path.is_file(), "save_json(path, obj) should create the file at path")
        expect(json.loads(path.read_text()) == {"stages": [1]}, "the file should hold obj as JSON")

        def broken_dump(obj, f, *args, **kwargs):
            f.write('{"stages": [1, ')  # the crash comes halfway through writing
            raise KeyboardInterrupt("killed mid-write")

        def broken_dumps(obj, *args, **kwargs):
            raise KeyboardInterrupt("killed mid-write")

        with mock.patch("json.dump", broken_dump), mock.patch("json.dumps", broken_dumps):
            try:
                fn(path, {"stages": [1, 2]})
            except KeyboardInterrupt:
                pass
        try:
            intact = json.loads(path.read_text()) == {"stages": [1]}
        except ValueError:  # half a JSON document
            intact = False
        expect(intact,
               "after a crash in the middle of a write the old file must still be there, whole: write to a "
               "temporary file in the same folder, then os.replace(tmp, path)")
        fn(path, {"stages": [1, 2]})
        expect(json.loads(path.read_text()) == {"stages": [1, 2]}, "a later write should replace the file")


@exercise("ch13.resume", "which stages a resumed run still has to train")
def check_resume(fn):
    _need_function(fn, "stages_to_run")
    stages = ["sft", "dpo", "grpo", "loyalty", "storm"]
    cases = [([], [], stages), (["dpo"], ["sft"], ["grpo", "loyalty", "storm"]),
             ([], ["sft", "dpo", "grpo", "loyalty", "storm"], []), (["storm"], ["sft", "dpo"], ["grpo", "loyalty"]),
             (["sft", "dpo"], [], ["grpo", "loyalty", "storm"])]
    for skip, finished, want in cases:
        got = fn(list(stages), list(skip), list(finished))
        expect(got is not None, "your function returned None: did you forget `return`?")
        expect(list(got) == want, f"stages_to_run(skip={skip}, finished={finished}) should be {want}, got {got}: "
               "keep the pipeline's order, leave out skipped and finished stages")


@exercise("ch13.epochs", "optimiser steps for a budget given in epochs")
def check_epochs(fn):
    _need_function(fn, "steps_for_epochs")
    for epochs, rows, batch in ((1, 100, 32), (0.5, 2000, 32), (3, 10, 4), (0.01, 50, 16)):
        got = fn(epochs, rows, batch)
        want = max(1, math.ceil(epochs * rows / batch))
        expect(got == want, f"steps_for_epochs({epochs}, {rows}, {batch}) should be {want}, got {got}: an epoch is "
               "rows / batch steps (round up; at least one step)")
