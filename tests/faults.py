"""Test-only fault injection into Ray Train workers; production code has no fault hooks.

`ray_local` (conftest.py) starts Ray with `install` as its worker-process setup hook, so every Ray
worker process patches `Trainer.after_step` at start-up. The patch reads a JSON spec file (path in
$RAYDPO_TEST_FAULTS, written by the `inject_fault` fixture): `{"at_step": N, "marker": PATH}` makes
the first worker that finishes step N raise before that step is logged or checkpointed, once (the
marker file records that it fired).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def spec() -> dict | None:
    path = os.environ.get("RAYDPO_TEST_FAULTS")
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def install() -> None:
    from raydpo.engine import loop

    original = loop.Trainer.after_step
    if getattr(original, "_fault_patched", False):
        return

    def after_step(self, pos, metrics, seconds, tokens):
        s = spec()
        if s and pos["step"] == s["at_step"] and not Path(s["marker"]).exists():
            Path(s["marker"]).write_text("fired")
            raise RuntimeError(f"injected fault after step {pos['step']}")
        return original(self, pos, metrics, seconds, tokens)

    after_step._fault_patched = True
    loop.Trainer.after_step = after_step
