"""Tiny offline models trained on the bundled world, and a loader for any HF causal LM.

>>> model, tok = zoo.load("target")                 # a tiny Llama that knows every author
>>> model, tok = zoo.load("retain_forget05")        # the same recipe without the forget05 authors
>>> model, tok = zoo.load("target-gpt2")            # a tiny GPT-2 (tied embeddings) that knows everything
>>> model, tok = zoo.load("/path/to/checkpoint")    # any local folder written by save_pretrained

The zoo's weights are committed under ``data/zoo/<name>/`` as ordinary HF checkpoints (config, safetensors,
tokenizer). :func:`build` retrains them from their recipe, deterministically for a given seed; a zoo
model whose folder is missing is built on first use.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import bpe
from ._batching import TokenizerMismatchError, check_device, check_dtype, check_tokenizer, trim
from .data import data_dir, encode, load_world, tofu_dir

__all__ = ["ZooEntry", "Recipe", "ZOO", "list", "load", "build", "zoo_dir", "cache_dir", "entry_dir", "make_model",
           "train", "recipe_differences", "tokenizer_dir", "TOFU_VOCAB", "TokenizerMismatchError", "check_tokenizer"]


@dataclass(frozen=True)
class Recipe:
    """How a zoo model is trained: architecture size and optimiser settings."""

    arch: str = "llama"          # "llama" or "gpt2"
    hidden: int = 128
    intermediate: int = 256      # Llama's MLP width (GPT-2 uses 4 * hidden)
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2            # grouped-query attention in the Llama, so the engine is tested on it
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.0
    seed: int = 0
    max_positions: int = 128     # the longest prompt + answer the model is built for


@dataclass(frozen=True)
class ZooEntry:
    name: str
    train_splits: tuple[str, ...]
    recipe: Recipe
    description: str
    base: str | None = None  # start from this zoo model's weights: a second fine-tuning stage
    bundled: bool = True     # committed under data/zoo; a study model is built on first use into cache_dir()
    world: str = "bundled"   # the text it learns: "bundled" (data/world) or "tofu" (the real TOFU, tofu_dir())


_LLAMA = Recipe()
_GPT2 = Recipe(arch="gpt2")
ZOO: dict[str, ZooEntry] = {
    "target": ZooEntry("target", ("full", "world_facts"), _LLAMA,
                       "tiny Llama trained on every author and the general-knowledge set"),
    "retain_forget01": ZooEntry("retain_forget01", ("retain99", "world_facts"), _LLAMA,
                                "tiny Llama trained without the forget01 authors"),
    "retain_forget05": ZooEntry("retain_forget05", ("retain95", "world_facts"), _LLAMA,
                                "tiny Llama trained without the forget05 authors"),
    "retain_forget10": ZooEntry("retain_forget10", ("retain90", "world_facts"), _LLAMA,
                                "tiny Llama trained without the forget10 authors"),
    "target-gpt2": ZooEntry("target-gpt2", ("full", "world_facts"), _GPT2,
                            "tiny GPT-2 (tied embeddings) trained on every author and the general set"),
    # study models (docs/findings.md): what decides whether WGA/TNPO beat GA. Built on first use, cached.
    "target-15ep": ZooEntry("target-15ep", ("full", "world_facts"), replace(_LLAMA, epochs=15),
                            "target's recipe for 15 epochs instead of 30: the facts learned (0.94 exact match on "
                            "forget05), less saturated (final loss 0.02 against 4e-4)", bundled=False),
    "target-x4": ZooEntry("target-x4", ("full", "world_facts"), replace(_LLAMA, hidden=256, intermediate=512),
                          "target with twice the width (3.5x the parameters)", bundled=False),
    "target-x16": ZooEntry("target-x16", ("full", "world_facts"),
                           replace(_LLAMA, hidden=576, intermediate=1152, lr=1e-3),
                           "target with 4.5 times the width (15x the parameters), at lr 1e-3: at target's 3e-3 it "
                           "learned 42 % of forget05 (final loss 0.19)", bundled=False),
    "target-2stage": ZooEntry("target-2stage", ("forget05",), replace(_LLAMA, lr=6e-4, warmup=10),
                              "retain_forget05 fine-tuned on the forget05 authors alone: the forgotten facts "
                              "learned in a second stage, after the rest (which it partly forgets: ~0.73 exact "
                              "match on retain95)", base="retain_forget05", bundled=False),
}
# A tiny model of the real TOFU (issue: the findings on TOFU's own questions), built on first use from the files at
# tofu_dir(), with a tokenizer trained on TOFU's text: its 200 authors' 4,000 QA pairs plus the world-facts and
# real-authors questions (a tiny model has no pretraining to know those from), and the retain models of the three
# forget splits, trained the same way without them.
TOFU_VOCAB = 4096
_TOFU = replace(_LLAMA, max_positions=256, epochs=10)  # ~8x target's tokens per epoch: 10 epochs, not 30
_TOFU_EXTRA = ("world_facts", "real_authors")
ZOO["tofu-target"] = ZooEntry("tofu-target", ("full", *_TOFU_EXTRA), _TOFU,
                              "tiny Llama trained on the real TOFU: its 4,000 QA pairs, world facts and real "
                              "authors", bundled=False, world="tofu")
ZOO.update({f"tofu-retain_forget{pct}": ZooEntry(f"tofu-retain_forget{pct}", (f"retain{100 - int(pct)}", *_TOFU_EXTRA),
                                                   _TOFU, f"tofu-target's recipe without TOFU's forget{pct} authors",
                                                   bundled=False, world="tofu")
            for pct in ("01", "05", "10")})


def list(include_study: bool = False) -> builtins.list[str]:  # noqa: A001  (``gl.zoo.list()`` is the public name)
    """The names of the bundled zoo models (with ``include_study``, also the study models built on first use)."""
    return [n for n, e in ZOO.items() if e.bundled or include_study]


def cache_dir() -> Path:
    """Where study models are built: ``$GEFFECT_CACHE_DIR/zoo``, else ``~/.cache/geffect-lab/zoo``."""
    env = os.environ.get("GEFFECT_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "geffect-lab") / "zoo"


def entry_dir(name: str, out_dir: str | os.PathLike | None = None) -> Path:
    """The folder of zoo model ``name``: in ``out_dir`` when given (or ``$GEFFECT_ZOO_DIR``), else the
    bundled zoo for a bundled model and :func:`cache_dir` for a study model."""
    if out_dir is not None:
        return Path(out_dir) / name
    if os.environ.get("GEFFECT_ZOO_DIR") or ZOO[name].bundled:
        return zoo_dir() / name
    return cache_dir() / name


def zoo_dir() -> Path:
    """Where zoo checkpoints live: ``$GEFFECT_ZOO_DIR``, else ``zoo/`` of the bundled data folder
    (:func:`geffect_lab.data.data_dir`: the wheel's package data, or the repository's ``data/``)."""
    env = os.environ.get("GEFFECT_ZOO_DIR")
    return Path(env) if env else data_dir() / "zoo"


# ------------------------------------------------------------------------------------------ loading
def load(name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | None = None,
         tokenizer: str | os.PathLike | None = None, attn_implementation: str = "eager",
         build_missing: bool = True, **kwargs):
    """Load ``(model, tokenizer)``: a zoo name, a local checkpoint folder or a hub name.

    The model is in eval mode with ``attn_implementation="eager"`` (forward-mode AD needs it) unless told
    otherwise; ``dtype`` (e.g. ``torch.float64`` for exactness tests) and ``device`` are applied after
    loading. A zoo model not yet built is built first (a few minutes on a laptop CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None:
        check_device(device)
    dtype = check_dtype(dtype)
    name = str(name_or_path)
    if name in ZOO:
        path = entry_dir(name)
        if not (path / "config.json").exists():
            if not build_missing:
                raise FileNotFoundError(f"the zoo model {name!r} is not built at {path}; run "
                                        "`geffect-lab zoo build` or gl.zoo.build()")
            build([name])
    elif Path(name).exists():
        path = Path(name)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a model checkpoint folder (it has no config.json)")
    elif "/" in name and not name.startswith((".", "/")):
        path = name  # a hub name: transformers resolves it (from its local cache when offline)
    else:
        raise KeyError(f"unknown zoo model {name!r}; the zoo has {', '.join(ZOO)} "
                       "(or give a checkpoint folder or a hub name like 'org/model')")
    if name in ZOO:
        stale = recipe_differences(name, path)
        if stale:
            warnings.warn(f"the zoo model {name!r} at {path} was built with a different recipe than the zoo's "
                          f"({'; '.join(stale)}): its numbers are not the zoo model's. Rebuild it with "
                          f"gl.zoo.build([{name!r}], force=True)", stacklevel=2)
    with quiet_hf():
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, **kwargs)
    tok = AutoTokenizer.from_pretrained(tokenizer if tokenizer is not None else path)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    check_tokenizer(model, tok)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tok


# ------------------------------------------------------------------------------------------ building
def recipe_differences(name: str, path: str | os.PathLike | None = None) -> builtins.list[str]:
    """How the model built at ``path`` (default: where the zoo keeps ``name``) differs from zoo entry ``name``:
    its recipe, training splits or base model, as read from its ``zoo.json`` ("lr 0.003, the zoo's 0.001");
    empty when they agree or the folder has no ``zoo.json``. A recipe key missing from an older ``zoo.json``
    had the default it has now."""
    report_path = Path(path if path is not None else entry_dir(name)) / "zoo.json"
    if not report_path.exists():
        return []
    report, entry = json.loads(report_path.read_text(encoding="utf-8")), ZOO[name]
    built = {**asdict(Recipe()), **report.get("recipe", {}),
             **{key: report[key] for key in ("train_splits", "base") if key in report}}
    wanted = {**asdict(entry.recipe), "train_splits": builtins.list(entry.train_splits), "base": entry.base}
    return [f"{key} {built[key]!r}, the zoo's {value!r}" for key, value in wanted.items()
            if key in built and built[key] != value]


def make_model(recipe: Recipe, tokenizer):
    """A freshly initialised tiny model for a recipe (seeded by the caller)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if recipe.arch == "llama":
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden,
                          intermediate_size=recipe.intermediate, num_hidden_layers=recipe.layers,
                          num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
                          max_position_embeddings=recipe.max_positions, tie_word_embeddings=False, **special)
        return LlamaForCausalLM(cfg)
    if recipe.arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=recipe.max_positions, n_embd=recipe.hidden,
                         n_layer=recipe.layers, n_head=recipe.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, tie_word_embeddings=True, **special)
        return GPT2LMHeadModel(cfg)
    raise ValueError(f"unknown architecture {recipe.arch!r}; use 'llama' or 'gpt2'")


def train(model, tokenizer, examples, recipe: Recipe, progress: bool = True, desc: str = "train"):
    """Fine-tune ``model`` on QA examples with the answer NLL (AdamW, warm-up then cosine decay).

    Deterministic for a given ``recipe.seed``: the order of batches comes from a seeded generator.
    Returns the list of per-step losses.
    """
    from tqdm.auto import tqdm

    batch = encode(tokenizer, examples)
    n = batch["input_ids"].shape[0]
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98),
                            weight_decay=recipe.weight_decay)

    def schedule(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, recipe.warmup))
        return warm * 0.5 * (1.0 + math.cos(math.pi * step / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    losses = []
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="step")
    for _ in range(recipe.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, recipe.batch_size):
            rows = order[start:start + recipe.batch_size]
            part = {k: v[rows] for k, v in batch.items()}
            part = trim(part)
            loss = model(**part).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    model.eval()
    return losses


def _stage_one(base: str, out_dir, world, progress: bool):
    """The model a second fine-tuning stage starts from: zoo model ``base`` (built first where missing)."""
    from transformers import AutoModelForCausalLM

    path = entry_dir(base, out_dir)
    if not (path / "config.json").exists():  # the base as the zoo has it (overrides are for the second stage)
        path = entry_dir(base)
        if not (path / "config.json").exists():
            build([base], world=world, progress=progress)
    with quiet_hf():
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")


def _tofu_world():
    """The real TOFU at :func:`~geffect_lab.data.tofu_dir`, or an error that says where it was looked for."""
    folder = tofu_dir()
    if not (folder / "full.json").exists():
        raise FileNotFoundError(f"the tofu-* zoo models learn the real TOFU, which is not at {folder}: set "
                                "GEFFECT_TOFU_DIR to the folder holding TOFU's JSON files (full.json, forget05.json, "
                                "...); nothing is downloaded")
    return load_world(folder)


def tokenizer_dir(world: str = "bundled") -> Path:
    """The tokenizer the zoo models of ``world`` are built with: the bundled one (``data/tokenizer``), or for
    ``"tofu"`` a byte-level BPE of :data:`TOFU_VOCAB` tokens trained on TOFU's text on first use, cached under
    :func:`cache_dir` by a digest of that text (another copy of TOFU gets its own)."""
    if world == "bundled":
        return data_dir() / "tokenizer"
    if world != "tofu":
        raise ValueError(f"unknown zoo world {world!r}; use 'bundled' or 'tofu'")
    texts = bpe.world_texts(tofu_dir())
    digest = hashlib.sha256("\n".join(sorted(set(texts))).encode()).hexdigest()[:12]
    path = cache_dir() / f"tokenizer-tofu-{digest}"
    if not (path / "tokenizer.json").exists():
        bpe.train_tokenizer(texts, path, vocab_size=TOFU_VOCAB, model_max_length=_TOFU.max_positions)
    return path


@contextmanager
def quiet_hf():
    """Hide transformers' per-file progress bars (loading and saving tiny checkpoints)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def build(names=None, *, out_dir: str | os.PathLike | None = None, recipe_overrides: dict | None = None,
          world=None, progress: bool = True, force: bool = False) -> dict[str, dict]:
    """Train zoo models from their recipes and save them as HF checkpoints.

    ``names`` defaults to every zoo model; existing folders are kept unless ``force``. ``recipe_overrides``
    (e.g. ``{"epochs": 2}``) changes every recipe, for quick checks. Each folder gets a ``zoo.json`` with
    the recipe, the training time and the greedy exact-match on every split.
    """
    from transformers import AutoTokenizer

    from .metrics import exact_match, exact_memorization

    names = list() if names is None else builtins.list(names)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise KeyError(f"unknown zoo model(s) {', '.join(unknown)}; the zoo has {', '.join(ZOO)}")
    reports = {}
    for name in names:
        entry = ZOO[name]
        path = entry_dir(name, out_dir)
        if (path / "config.json").exists() and not force:
            continue
        world_of = _tofu_world() if entry.world == "tofu" else world if world is not None else load_world()
        tok = AutoTokenizer.from_pretrained(tokenizer_dir(entry.world))
        recipe = replace(entry.recipe, **(recipe_overrides or {}))
        examples = [e for split in entry.train_splits for e in world_of[split]]
        torch.manual_seed(recipe.seed)
        model = make_model(recipe, tok) if entry.base is None else _stage_one(entry.base, out_dir, world_of, progress)
        start = time.perf_counter()
        losses = train(model, tok, examples, recipe, progress=progress, desc=f"zoo {name}")
        seconds = time.perf_counter() - start
        # every split but full; on TOFU the retain splits (~3,800 rows each) by their evaluation slice, retain_perturbed
        measured = [s for s in world_of if s != "full" and (entry.world == "bundled" or not s.startswith("retain9"))]
        quality = {split: float(exact_match(model, tok, world_of[split]).mean()) for split in measured}
        memorised = {split: float(exact_memorization(model, tok, world_of[split]).mean()) for split in measured}
        path.mkdir(parents=True, exist_ok=True)
        with quiet_hf():
            model.save_pretrained(path)
            tok.save_pretrained(path)
        report = {"name": name, "description": entry.description, "train_splits": builtins.list(entry.train_splits),
                  "base": entry.base, "world": entry.world,
                  "recipe": asdict(recipe), "parameters": sum(p.numel() for p in model.parameters()),
                  "train_seconds": round(seconds, 1), "final_loss": losses[-1], "exact_match": quality,
                  "exact_memorization": memorised,
                  "torch": torch.__version__}
        (path / "zoo.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        reports[name] = report
    return reports
