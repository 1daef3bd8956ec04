"""G-effects recorded from a training loop you own: a plain PyTorch loop, an HF ``Trainer``, open-unlearning.

:func:`geffect_lab.unlearn` owns its loop; this module does not need to. A :class:`GEffectRecorder` holds one
measurement (objective, forget samples, targets — encoded once, the reference quantities taken once) and takes
it at whatever parameters the model has when it is called::

    rec = gl.GEffectRecorder(tok, "npo", forget=world["forget05"][:16],
                             targets={"targeted": world["forget05"][16:], "non_targeted": world["retain95"][:32]})
    for step, batch in enumerate(loader):
        rec.record(model, step, lr=scheduler.get_last_lr()[0])   # before the update: G-effects at θ_t
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
    ds = rec.dataset()          # dims step × instance × layer × term (…), the same schema as gl.unlearn's

or, to record the optimiser's actual step as well (``update_effect``), wrap the update::

    with rec.update(model, step, lr=scheduler.get_last_lr()[0]):
        optimizer.step()

With an HF ``Trainer``: ``Trainer(..., callbacks=[rec.trainer_callback()])``.

The objective here is the one whose G-effects are measured, on the recorder's fixed forget samples: a loop that
trains on that objective over those samples gets G-effects that predict its own steps (first order:
``ΔR_i ≈ -lr · Σ_l e_{i,l}``); a loop that trains on something else gets what the named objective *would* do
at the loop's parameters, which is also worth having.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import xarray as xr

from ._batching import check_tokenizer_type, swapped_parameters, trainable_parameters, update_direction
from .data import check_records
from .engine.api import Measurement, check_chunk_size, check_verify
from .results import StepTable, check_output_path, save

__all__ = ["GEffectRecorder", "RecordingError"]


class RecordingError(RuntimeError):
    """A measurement failed inside a training loop; every step recorded before it is kept (``dataset()``, and
    the ``out`` file when given)."""


class GEffectRecorder:
    """G-effects of ``objective`` at each step of a training loop, into one Dataset.

    Parameters
    ----------
    tokenizer:
        The model's tokenizer.
    objective, params:
        What is measured: a registered name, a composite (``"npo+gd"``) or objective objects; as in
        :func:`geffect_lab.g_effect`.
    forget, retain:
        The samples that feed the objective's forget term (and its regularisers); fixed for the whole run, so
        ``sample`` is one coordinate across steps.
    targets:
        The instances whose risk gradients are measured: ``{"targeted": [...], "non_targeted": [...]}``.
    reference:
        ``"initial"`` (default): the model as it is at the first recorded step, frozen — only the quantities
        the objective reads from it are kept, not a copy of the model. A model: that frozen reference.
    per_token, pg:
        Also record per-token G-effects and, per forget sample, the paper's PG-effect and the sample effect.
    every:
        Record at steps ``0, every, 2·every, …``; :meth:`record` ignores other steps.
    chunk_size:
        Target instances per engine pass (bounds memory).
    verify:
        As in :func:`geffect_lab.g_effect`: the first record checks the engine against one plain backward.
    out:
        A ``.nc`` file rewritten (atomically) after every recorded step, so a training that crashes or is
        killed leaves every step recorded so far on disk.
    """

    def __init__(self, tokenizer, objective="ga", params: Mapping[str, Any] | None = None, *, forget: Sequence,
                 targets, retain: Sequence | None = None, refusals: Sequence[str] | None = None,
                 reference="initial", per_token: bool = True, pg: bool = False, every: int = 1,
                 chunk_size: int | None = 16, template=None, verify: str = "first", out=None):
        check_tokenizer_type(tokenizer)
        self.out = check_output_path(out) if out is not None else None
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} is not valid; use a whole number >= 1 (record every k-th step)")
        check_chunk_size(chunk_size)
        # the records are checked now, not at the first record() inside someone's training loop
        check_records(forget, "forget")
        if retain:
            check_records(retain, "retain")
        for name, items in (targets.items() if isinstance(targets, Mapping) else [("targeted", targets)]):
            check_records(items, f"target set {name!r}")
        self.tokenizer = tokenizer
        self._spec = dict(objective=objective, params=params, forget=list(forget), targets=targets,
                          retain=retain, refusals=refusals, template=template, verify=check_verify(verify))
        self._initial = isinstance(reference, str)
        if self._initial and reference != "initial":
            raise ValueError(f"reference={reference!r}: use 'initial' (the model at the first record) or a model")
        self._reference = reference
        self.per_token, self.pg, self.every, self.chunk_size = per_token, pg, every, chunk_size
        self._measurement: Measurement | None = None
        self._table: StepTable | None = None
        self._attrs: dict[str, Any] = {}
        self._running = False  # inside an HF Trainer's train(): between on_train_begin and on_train_end

    # ------------------------------------------------------------------ taking measurements
    def due(self, step: int) -> bool:
        """Whether ``step`` is one the recorder records."""
        return step % self.every == 0

    def _ready(self, model) -> Measurement:
        if self._measurement is None:
            m = Measurement(model, self.tokenizer, **self._spec)
            m.set_reference(model if self._initial else self._reference,
                            label="initial model" if self._initial else "given")
            self._measurement, self._table = m, StepTable(m.axes, m.token_count)
            self._attrs = m.attrs(model)
        return self._measurement

    def _take(self, model, step: int, lr: float | None, extra=()) -> xr.Dataset:
        if self._table is not None and self._table.steps and step <= self._table.steps[-1]:
            raise ValueError(f"step {step} was given after step {self._table.steps[-1]}: steps must increase")
        try:
            m = self._ready(model)
            ds = m.measure(model, step, data=None if lr is None else {"learning_rate": float(lr)},
                           per_token=self.per_token, pg=self.pg, chunk_size=self.chunk_size, extra=extra)
        except Exception as err:
            kept = f"the {len(self)} recorded step(s) are in recorder.dataset()" + (
                f" and in {self.out}" if self.out is not None and len(self) else "")
            raise RecordingError(f"recording the G-effects at step {step} failed: {type(err).__name__}: {err} "
                                 f"({kept})") from err
        self._table.add_dataset(ds)
        if self.out is not None:
            save(self.dataset(), self.out)
        return ds

    def record(self, model, step: int, lr: float | None = None) -> xr.Dataset | None:
        """Measure at the model's current parameters (call it before the step's update) and keep the result as
        ``step``. ``lr``, the learning rate the coming update uses, makes ``ds.geffect.cumulative()`` work.

        Returns
        -------
        xarray.Dataset or None
            The one-step Dataset (as :meth:`dataset`, one ``step``: ``g_effect`` [step, instance, layer, term],
            ``risk`` [step, instance], …), or None when ``step`` is not :meth:`due`.
        """
        if not self.due(step):
            return None
        return self._take(model, step, lr)

    @contextmanager
    def update(self, model, step: int, lr: float) -> Iterator[None]:
        """Wrap the optimiser's update: the parameters before it are kept, and after it the G-effects are
        measured at those parameters together with ``update_effect``, the inner product of each instance's
        risk gradient with the actual step (``(θ_t − θ_{t+1}) / lr``). Costs one copy of the trainable
        parameters while it lasts. Nothing is measured when the block raises or ``step`` is not due."""
        if not self.due(step):
            yield
            return
        params = trainable_parameters(model)
        before = [p.detach().clone() for p in params]
        yield
        direction = update_direction(params, before, lr)
        with swapped_parameters(params, before):
            self._take(model, step, lr, extra=[direction])

    # ------------------------------------------------------------------ results
    def __len__(self) -> int:
        return len(self._table) if self._table is not None else 0

    def dataset(self) -> xr.Dataset:
        """Every recorded step in one Dataset (the schema of :func:`geffect_lab.unlearn`'s); a variable missing
        at some steps (``learning_rate`` without ``lr``, ``update_effect`` outside :meth:`update`) is NaN there.

        Returns
        -------
        xarray.Dataset
            ``g_effect`` [step, instance, layer, term], ``g_effect_token`` [step, instance, token],
            ``pg_effect`` and ``sample_effect`` [step, sample, against], ``update_effect`` [step, instance, layer],
            ``risk`` [step, instance], ``objective_loss`` [step], ``learning_rate`` [step].
        """
        if not len(self):
            raise ValueError("nothing recorded yet: call record(model, step) (or use trainer_callback()) first")
        ended = {"complete": 1} if not self._running else {
            "complete": 0, "stop_reason": "the Trainer had not reached on_train_end (it raised, was stopped, or "
                                          "is still running)"}
        return self._table.dataset({**self._attrs, "recorded_by": "GEffectRecorder", "record_every": self.every,
                                    **ended})

    # ------------------------------------------------------------------ HF Trainer
    def trainer_callback(self, update_effect: bool = False):
        """A ``transformers.TrainerCallback`` that records at the Trainer's global steps: before each due step
        (``on_step_begin``), or around its optimiser step with ``update_effect=True``. The learning rate is read
        from the optimiser."""
        from transformers import TrainerCallback

        recorder = self

        def lr_of(optimizer) -> float | None:
            return None if optimizer is None else float(optimizer.param_groups[0]["lr"])

        class GEffectCallback(TrainerCallback):
            def __init__(self):
                self._open = None

            def on_train_begin(self, args, state, control, **kwargs):
                recorder._running = True

            def on_train_end(self, args, state, control, **kwargs):
                recorder._running = False

            def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
                if not update_effect:
                    recorder.record(model, state.global_step, lr=lr_of(optimizer))

            def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
                if update_effect:
                    self._open = recorder.update(model, state.global_step, lr=lr_of(optimizer))
                    self._open.__enter__()

            def on_optimizer_step(self, args, state, control, **kwargs):
                if self._open is not None:
                    opened, self._open = self._open, None
                    opened.__exit__(None, None, None)

        return GEffectCallback()
