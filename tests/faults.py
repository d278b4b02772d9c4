"""Test-only fault injection into Ray Train workers; production code has no fault hooks.

`ray_local` (conftest.py) starts Ray with `install` as its worker-process setup hook, so every Ray
worker process patches `Trainer.after_step` at start-up. The patch reads a JSON spec file (path in
$RAYDPO_TEST_FAULTS, written by the `inject_fault` fixture): `{"at_step": N, "marker": PATH}` makes
the first worker that finishes step N raise before that step is logged or checkpointed, once (the
marker file records that it fired); `{"inf_grad_at_step": N}` makes every worker's gradient of one
parameter infinite during step N (a real backward pass through a gradient hook, not a mocked step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


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
    original_step = loop.Trainer.step

    def step(self, batch, step_no):
        s = spec()
        if not (s and s.get("inf_grad_at_step") == step_no):
            return original_step(self, batch, step_no)
        param = next(p for p in self.policy.parameters() if p.requires_grad)
        handle = param.register_hook(lambda g: torch.full_like(g, float("inf")))
        try:
            return original_step(self, batch, step_no)
        finally:
            handle.remove()

    loop.Trainer.step = step
