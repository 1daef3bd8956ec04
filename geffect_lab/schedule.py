"""The learning rate of every update of a run an HF ``Trainer`` saved, in the convention of ``gl.unlearn``.

geffect-lab stores at step ``t`` the rate of the update that takes ``θ_t`` to ``θ_{t+1}`` (``gl.unlearn`` and
:class:`~geffect_lab.recorder.GEffectRecorder` read it before the optimiser steps), so that ``-lr_t · e_t``
predicts the risk change of that update. A Trainer folder says it two ways, each read here:

- **The schedule.** ``training_args.bin`` (the ``TrainingArguments``) and ``trainer_state.json``'s ``max_steps``
  rebuild the scheduler exactly as the Trainer builds it (``transformers.get_scheduler`` with the same type,
  warm-up and keyword arguments), and stepping it gives every update's rate. The file is a pickle: it is read
  with ``torch.load(weights_only=True)``, allowing only the classes of transformers and accelerate that the
  Trainer pickles there, so no other code runs.
- **The log.** ``log_history`` holds the rate at each logged ``step``. Which update that is depends on the
  transformers version that *wrote* the run (``config.json``'s ``transformers_version``): from 4.51 on the
  Trainer logs the rate the update into step ``N`` used (the update ``N−1 → N``), before that the rate of the
  next update (``N → N+1``).

Where both are there they must agree at every logged step; where they disagree the log (what the Trainer did)
is kept and the steps it does not cover are left unknown. Unknown rates are NaN, never guessed; the Dataset says
where its rates came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# transformers 4.51 (its pull request 36973) moved the logged rate from the next update to the one just taken
LOGS_THE_UPDATE_TAKEN_FROM = (4, 51)

CONVENTION = ("learning_rate at step t is the rate of the update from step t to step t+1 (as gl.unlearn and "
              "GEffectRecorder store it); NaN where no update follows or the rate is unknown")


@dataclass(frozen=True)
class Rates:
    """The rate of the update leaving each step (``by_step``), and a sentence saying where it was read."""

    by_step: dict[int, float]
    source: str

    def at(self, step: int) -> float:
        return self.by_step.get(step, math.nan)


def _version(text: str | None) -> tuple[int, int] | None:
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except (ValueError, TypeError):
        return None


def writer_version(folders: Sequence[Path]) -> tuple[int, int] | None:
    """The transformers version that saved the checkpoints (``config.json``), or None when none says."""
    for folder in folders:
        path = folder / "config.json"
        if path.exists():
            version = _version(json.loads(path.read_text()).get("transformers_version"))
            if version is not None:
                return version
    return None


def logged_rates(state: dict, version: tuple[int, int] | None) -> dict[int, float] | None:
    """The rate of the update leaving each step, read from ``log_history``; None when the writer's version (and
    so which update a logged rate belongs to) is unknown."""
    logged = {int(e["step"]): float(e["learning_rate"]) for e in state.get("log_history", [])
              if "learning_rate" in e and "step" in e}
    if version is None:
        return None if logged else {}
    shift = 1 if version >= LOGS_THE_UPDATE_TAKEN_FROM else 0
    return {step - shift: lr for step, lr in logged.items() if step - shift >= 0}


def _training_arguments(path: Path):
    """``training_args.bin`` unpickled with only transformers' and accelerate's classes allowed (None when it
    holds others)."""
    import importlib

    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a torch file we can read: the schedule stays unknown
        return None
    allowed = []
    for name in names:
        module, _, attr = name.rpartition(".")
        if not module.startswith(("transformers.", "accelerate.")):
            return None  # a class of another package (TRL's, open-unlearning's arguments): not unpickled here
        allowed.append(getattr(importlib.import_module(module), attr))
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001
            return None


def scheduled_rates(args, max_steps: int) -> dict[int, float]:
    """The rate of each update ``t → t+1`` (``0 <= t < max_steps``) of the scheduler the Trainer builds."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=args.get_warmup_steps(max_steps), num_training_steps=max_steps,
                              scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    rates = {}
    for step in range(max_steps):
        rates[step] = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _agree(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-15)


def read_rates(folders: Sequence[Path]) -> Rates:
    """The rates of a run's updates from its checkpoint folders (the last one's ``trainer_state.json`` holds the
    whole run's log; any ``training_args.bin`` its arguments)."""
    states = [json.loads((f / "trainer_state.json").read_text()) for f in folders
              if (f / "trainer_state.json").exists()]
    state = max(states, key=lambda s: int(s.get("global_step", 0)), default={})
    logged = logged_rates(state, writer_version(folders))
    args_files = [f / "training_args.bin" for f in folders if (f / "training_args.bin").exists()]
    args = _training_arguments(args_files[-1]) if args_files else None
    max_steps = int(state.get("max_steps") or 0)
    scheduled = scheduled_rates(args, max_steps) if args is not None and max_steps > 0 else None
    if scheduled is not None:
        clash = [s for s, lr in (logged or {}).items() if s in scheduled and not _agree(lr, scheduled[s])]
        if not clash:
            return Rates(scheduled, "the Trainer's schedule (training_args.bin, max_steps), rebuilt with "
                                    "transformers.get_scheduler" + (", agreeing with log_history" if logged else ""))
        s = clash[0]
        return Rates(logged or {}, f"log_history only: the schedule rebuilt from training_args.bin gives "
                                   f"{scheduled[s]:.6g} for the update leaving step {s}, the log {logged[s]:.6g}; "
                                   "steps the log does not cover are unknown")
    if logged is None:
        return Rates({}, "unknown: log_history has rates but no config.json says which transformers version wrote "
                         "them (from 4.51 a logged rate is the previous update's), and training_args.bin could not "
                         "be read")
    if not logged:
        return Rates({}, "unknown: no learning_rate in log_history and no readable training_args.bin")
    return Rates(logged, "log_history (the Trainer's logged rates, every logged step)")
