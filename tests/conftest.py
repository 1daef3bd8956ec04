"""Session fixtures: the bundled world, its tokenizer and the zoo models, each loaded once."""

from __future__ import annotations

import os

import pytest
import torch

import geffect_lab as gl
from geffect_lab.data import data_dir, tofu_dir

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def world():
    return gl.load_world()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data_dir() / "tokenizer")


@pytest.fixture(scope="session")
def tofu_path():
    path = tofu_dir()
    if not (path / "full.json").exists():
        pytest.skip(f"the real TOFU files are not at {path}; set GEFFECT_TOFU_DIR to the folder holding them")
    return path


@pytest.fixture(scope="session")
def target():
    return gl.zoo.load("target")


@pytest.fixture(scope="session")
def target_gpt2():
    return gl.zoo.load("target-gpt2")


@pytest.fixture(scope="session")
def short_runs(target, world, tmp_path_factory):
    """Three short recorded runs (GA, NPO+GD, WGA) on 8 + 8 instances, with metrics, saved to disk."""
    model, tok = target
    ev = {"targeted": world["forget05"][::6][:8], "non_targeted": world["retain_perturbed"][::25][:8]}
    folder = tmp_path_factory.mktemp("runs")
    runs = {}
    for name in ("ga", "npo+gd", "wga"):
        ds = gl.unlearn(model, tok, name, world=world, eval=ev, steps=4, lr=1e-3, eval_every=2, progress=False)
        gl.save(ds, folder / f"{name.replace('+', '_')}.nc")
        runs[name] = ds
    return runs, folder


@pytest.fixture
def scratch_objectives():
    """Objectives a test registers are unregistered after it: the registry is left as the test found it."""
    before = set(gl.list_objectives())
    yield gl.objective
    for name in set(gl.list_objectives()) - before:
        gl.objectives.remove_objective(name)


def ga_loss(model, batch) -> torch.Tensor:
    """Gradient ascent written by hand, as a user's loop would: minus the mean over samples of each answer's mean
    token NLL (the built-in ``ga`` objective's definition)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = out.logits[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return -((nll * mask).sum(1) / mask.sum(1)).mean()


@pytest.fixture(scope="session")
def hand_written_ga():
    return ga_loss


@pytest.fixture(scope="session")
def ga_trainer():
    """``make(model, tok, forget, callbacks, **training_args)``: an HF Trainer running SGD gradient ascent (the
    hand-written loss) on ``forget`` in one full batch, constant learning rate, on the CPU."""
    from transformers import Trainer, TrainingArguments

    class GATrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return ga_loss(model, inputs)

    def make(model, tok, forget, callbacks=(), **overrides):
        batch = gl.encode(tok, forget)
        rows = [{k: v[i] for k, v in batch.items()} for i in range(len(forget))]
        args = dict(per_device_train_batch_size=len(forget), optim="sgd", lr_scheduler_type="constant",
                    weight_decay=0.0, max_grad_norm=0.0, save_strategy="no", logging_strategy="no", report_to=[],
                    use_cpu=True, remove_unused_columns=False, seed=0, disable_tqdm=True)
        return GATrainer(model=model, args=TrainingArguments(**{**args, **overrides}), train_dataset=rows,
                         processing_class=tok, callbacks=list(callbacks))

    return make
