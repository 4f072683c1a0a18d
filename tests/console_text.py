"""Reading a job's console the way a terminal shows it, and what a clean one looks like."""
from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Lines of Ray's own machinery that RayNoiseFilter drops, and warnings our stream settings avoid.
RAY_NOISE = ("core_worker.cc", "TrainingReport(", "Checkpoint successfully created", "Execution plan of Dataset",
             "exclude_resources", "not writable", "torch.jit.trace")


def screen(text: str) -> list:
    """The lines a terminal keeps: a bar's in-place redraws (\\r) collapse to their last state."""
    return [ANSI.sub("", line.split("\r")[-1]).rstrip() for line in text.split("\n")]


def assert_clean_console(lines: list) -> None:
    """No Ray-internal line, each warning once, the LPIPS fallback warning at most once."""
    for noise in RAY_NOISE:
        assert noise not in "\n".join(lines), (noise, [line for line in lines if noise in line][:3])
    warned = [line for line in lines if "WARNING" in line or "Warning:" in line]
    assert len(warned) == len(set(warned)), warned
    assert sum("RANDOMLY INITIALISED" in line for line in lines) <= 1
