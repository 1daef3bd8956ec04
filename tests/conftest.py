"""Session fixtures: the bundled world, its tokenizer and the zoo models, each loaded once.

Before anything is imported, the test session is made hermetic: every place the package or its libraries read or
write outside the checkout (the home directory, geffect-lab's model cache, Hugging Face's, matplotlib's, Jupyter's
and IPython's folders, the XDG folders, Dask's scratch space) points into one fresh temporary folder, so nothing of
this machine's earlier runs can make a test pass, and no test writes into the user's own caches. Subprocesses
(notebook kernels, Dask workers, the CLI) inherit it. The real TOFU files are read-only data: their location is
pinned to the project's ``shared/data/tofu`` beside the checkout, never taken from the user's setting.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# ``GEFFECT_TEST_HOME`` (set by .ci/run, which then shows what the tests put there) or a new temporary folder
HERMETIC_HOME = Path(os.environ.get("GEFFECT_TEST_HOME") or tempfile.mkdtemp(prefix="geffect-test-home-"))
HERMETIC_ENV = {
    "HOME": HERMETIC_HOME,
    "GEFFECT_CACHE_DIR": HERMETIC_HOME / "geffect-cache",  # the study models, built on first use
    "HF_HOME": HERMETIC_HOME / "huggingface",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # nothing is downloaded
    "MPLCONFIGDIR": HERMETIC_HOME / "matplotlib",
    "XDG_CACHE_HOME": HERMETIC_HOME / ".cache", "XDG_CONFIG_HOME": HERMETIC_HOME / ".config",
    "XDG_DATA_HOME": HERMETIC_HOME / ".local" / "share",
    "JUPYTER_CONFIG_DIR": HERMETIC_HOME / "jupyter" / "config",
    "JUPYTER_DATA_DIR": HERMETIC_HOME / "jupyter" / "data",
    "JUPYTER_RUNTIME_DIR": HERMETIC_HOME / "jupyter" / "runtime",
    "IPYTHONDIR": HERMETIC_HOME / "ipython",
    "DASK_TEMPORARY_DIRECTORY": HERMETIC_HOME / "dask",
    "TORCHINDUCTOR_CACHE_DIR": HERMETIC_HOME / "torchinductor",
}
# what a user may have set that would point the package elsewhere than its own bundled data
USER_SETTINGS = ("GEFFECT_ZOO_DIR", "GEFFECT_DATA_DIR", "GEFFECT_TOFU_DIR", "DASK_CONFIG", "PYTHONSTARTUP")


def _make_hermetic() -> None:
    for name in USER_SETTINGS:
        os.environ.pop(name, None)
    for name, value in HERMETIC_ENV.items():
        if isinstance(value, Path):
            value.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(value)
    from geffect_lab.data import tofu_dir  # the project's shared/data/tofu (the user's setting was removed above)

    os.environ["GEFFECT_TOFU_DIR"] = str(tofu_dir())


_make_hermetic()


def pytest_sessionfinish(session, exitstatus):
    """A folder this session made is removed; one given by ``GEFFECT_TEST_HOME`` is left for its owner."""
    if not os.environ.get("GEFFECT_TEST_HOME"):
        import shutil

        shutil.rmtree(HERMETIC_HOME, ignore_errors=True)

import pytest  # noqa: E402  (after the environment is set: libraries read it when imported)
import torch  # noqa: E402

import geffect_lab as gl  # noqa: E402
from geffect_lab.data import data_dir, tofu_dir  # noqa: E402

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
