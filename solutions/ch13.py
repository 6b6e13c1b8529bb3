"""Worked solutions (and plausible wrong answers) for the chapter 13 exercises."""

import json
import math
import os
import tempfile
from pathlib import Path


def atomic_write():
    def save_json(path, obj):
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f)
            os.replace(tmp, path)  # atomic: readers see the old file or the new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    return save_json


def resume():
    def stages_to_run(stages, skip, finished):
        return [s for s in stages if s not in skip and s not in finished]

    return stages_to_run


def epochs():
    def steps_for_epochs(epochs, rows, batch):
        return max(1, math.ceil(epochs * rows / batch))

    return steps_for_epochs


def _direct_write(path, obj):
    with open(path, "w") as f:  # a crash mid-write leaves half a file
        json.dump(obj, f)


SOLUTIONS = {"ch13.atomic_write": atomic_write, "ch13.resume": resume, "ch13.epochs": epochs}

WRONG = {
    "ch13.atomic_write": lambda: _direct_write,
    "ch13.resume": lambda: lambda stages, skip, finished: [s for s in stages if s not in skip],  # redoes finished ones
    "ch13.epochs": lambda: lambda epochs, rows, batch: int(epochs * rows / batch),  # rounds down, may give 0
}
