"""Test-only fault injection into Ray Train workers; production code has no fault hooks.

`ray_local` (conftest.py) starts Ray with `install` as its worker-process setup hook, so every Ray
worker process patches `Trainer.after_step` and `Trainer.step` when it imports `raydpo.engine.loop`
(an import hook: a process that never trains, such as a Ray Data task or Ray Train's controller, does
not pay for importing torch and the engine at start-up). The patch reads a JSON spec file (path in
$RAYDPO_TEST_FAULTS, written by the `inject_fault` fixture): `{"at_step": N, "marker": PATH}` makes
the first worker that finishes step N raise before that step is logged or checkpointed, once (the
marker file records that it fired); `{"inf_grad_at_step": N}` makes every worker's gradient of one
parameter infinite during step N (a real backward pass through a gradient hook, not a mocked step).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
from pathlib import Path

TARGET = "raydpo.engine.loop"


def spec() -> dict | None:
    path = os.environ.get("RAYDPO_TEST_FAULTS")
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds TARGET with the other finders and patches the module right after it executes."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once, and no recursion into this finder
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if TARGET in sys.modules:
        patch(sys.modules[TARGET])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def patch(loop) -> None:
    import torch

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
