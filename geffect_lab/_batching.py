"""Small helpers shared by the kernel-side modules: chunking encoded batches and running no-grad
forward passes over many instances."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's input embedding (where token ids must go)."""
    try:
        embedding = model.get_input_embeddings()
        device = embedding.weight.device
    except (AttributeError, NotImplementedError):
        embedding, device = model, next(model.parameters()).device
    if device.type == "meta":  # weights offloaded by accelerate: its hook says where the forward runs
        hook = getattr(embedding, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            if getattr(h, "execution_device", None) is not None:
                return torch.device(h.execution_device)
    return device


def check_device(device) -> torch.device:
    """``device`` parsed and checked to exist on this machine, or one error naming it and what does exist."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device name; use 'cpu', 'cuda', 'cuda:1', 'mps'") from err
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            have = f" (cuda:0 … cuda:{n - 1})" if n else ""
            raise ValueError(f"device={device!r} does not exist here: this machine has {n} CUDA device(s){have}; "
                             "use 'cpu'")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} does not exist here (no Apple GPU); use 'cpu'")
    return dev


DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def check_dtype(dtype) -> torch.dtype | None:
    """``dtype`` as a floating torch dtype (its name, e.g. ``"bfloat16"``, is accepted), or None."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    name = str(dtype).replace("torch.", "")
    if isinstance(dtype, str) and name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"dtype={dtype!r} is not valid; use one of {', '.join(DTYPES)} (a name or a torch.dtype), "
                     "or None to keep the model's")


def check_model(model, what: str = "model") -> torch.nn.Module:
    """Refuse what cannot be measured, by name: not a torch module (a name or a path given instead of a
    loaded model), or parameters in several floating dtypes that meet in one matrix product (the forward
    would fail deep inside torch). Adapters (LoRA keeps float32 weights on a bfloat16 base) and modules the
    model itself keeps in float32 (transformers' ``_keep_in_fp32_modules``) may differ from the base."""
    if not isinstance(model, torch.nn.Module):
        hint = (f" (a name: load it first, e.g. gl.zoo.load({model!r}) or "
                "AutoModelForCausalLM.from_pretrained)") if isinstance(model, (str, bytes)) else ""
        raise TypeError(f"{what} must be a loaded torch model (a transformers causal LM), not "
                        f"{type(model).__name__} {str(model)[:60]!r}{hint}")
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    dtypes: dict[torch.dtype, str] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and "lora_" not in name and "modules_to_save" not in name \
                and not any(k in name.split(".") for k in keep):
            dtypes.setdefault(p.dtype, name)
    if len(dtypes) > 1:
        found = ", ".join(f"{str(d).replace('torch.', '')} (e.g. {n})" for d, n in dtypes.items())
        raise ValueError(f"the {what}'s parameters mix floating dtypes: {found}; a forward pass cannot multiply "
                         f"them together. Cast the whole {what} to one, e.g. {what}.to(torch.float32)")
    return model


def check_tokenizer_type(tokenizer) -> None:
    """A tokenizer object (not None, not a name): it must encode text and know its vocabulary size."""
    if tokenizer is None or isinstance(tokenizer, (str, bytes)) or not callable(tokenizer) \
            or not hasattr(tokenizer, "__len__"):
        hint = f"; load it first, e.g. AutoTokenizer.from_pretrained({tokenizer!r})" if isinstance(tokenizer, str) \
            else ""
        raise TypeError(f"tokenizer must be a loaded tokenizer (a transformers PreTrainedTokenizer), not "
                        f"{type(tokenizer).__name__} {str(tokenizer)[:60]!r}{hint}")


@contextmanager
def captured_output(module: torch.nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """A list that receives ``module``'s output (its first element, for a block returning a tuple) at every
    forward inside the block; the hook is removed on exit, whatever happens. ``None``: nothing is captured."""
    captured: list[torch.Tensor] = []
    if module is None:
        yield captured
        return

    def grab(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(grab)
    try:
        yield captured
    finally:
        handle.remove()


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary; a half-precision model's logits are taken in float32 first."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns that every row of a right-padded batch shares."""
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in batch.items()}


def chunks(batch: dict[str, torch.Tensor], size: int | None) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
    """Rows of a batch ``size`` at a time (all at once when ``size`` is None), trimmed of shared padding."""
    n = batch["input_ids"].shape[0]
    size = n if not size else size
    for start in range(0, n, size):
        rows = slice(start, min(n, start + size))
        yield rows, trim({k: v[rows] for k, v in batch.items()})


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align next-token logits with their labels: ``(logits[:, :-1], labels[:, 1:], mask)``."""
    lab = labels[:, 1:]
    return logits[:, :-1], lab, lab != -100


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode for the block (no dropout), the model's own mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that require grad, each once (tied weights are one parameter), in model order."""
    return [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]


@contextmanager
def swapped_parameters(params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Hold ``values`` in ``params`` (their ``.data`` swapped, no copy) for the block, and swap back."""
    for p, v in zip(params, values):
        p.data, v.data = v.data, p.data
    try:
        yield
    finally:
        for p, v in zip(params, values):
            p.data, v.data = v.data, p.data


def update_direction(params: Sequence[torch.nn.Parameter], before: Sequence[torch.Tensor], lr: float
                     ) -> dict[int, torch.Tensor]:
    """The optimiser's step as a direction in the G-effect's units: ``(θ_t − θ_{t+1}) / lr`` per parameter, so
    that for plain SGD it equals the objective's gradient and ``-lr ·`` its inner product predicts ``ΔR``."""
    if not lr:
        raise ValueError("the update effect needs the step's learning rate (lr > 0)")
    return {id(p): (b - p.detach()) / lr for p, b in zip(params, before)}


class TokenizerMismatchError(ValueError):
    """A tokenizer whose ids do not fit the model's embedding."""


def check_tokenizer(model, tokenizer) -> None:
    """Refuse a tokenizer with more tokens than the model has embedding rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise TokenizerMismatchError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: they do "
            "not belong together. Load the tokenizer saved with this model.")


def check_number(name: str, value, *, whole: bool = False, zero: bool = False, optional: bool = False) -> None:
    """One check for every numeric option: a finite number (a whole one where ``whole``), > 0 (>= 0 with
    ``zero``), or None where ``optional``; the error names the option, the value and what is valid."""
    if value is None and optional:
        return
    kind = "a whole number" if whole else "a finite number"
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer) if whole else (int, float, np.number))
    ok = ok and math.isfinite(float(value)) and (value >= 0 if zero else value > 0)
    if not ok:
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{name}={value!r} is not valid; use {kind} {bound}" + (" (or None)" if optional else ""))
