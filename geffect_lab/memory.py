"""How much memory :func:`geffect_lab.g_effect` (the fast engine) needs, from shapes alone, and the largest
``chunk_size`` that fits a budget.

>>> from geffect_lab.memory import estimate_memory, auto_chunk_size
>>> plan = estimate_memory(model, n_instances=64, seq_len=256, chunk_size=8)     # or a PretrainedConfig
>>> plan["peak"] / 2**30                                                          # GiB, weights included
>>> gl.g_effect(..., chunk_size=auto_chunk_size(model, 64, 256))

The estimate is a model of what the engine holds, not a replay of an allocator. The activation sizes come from
one forward of a ``[1, seq_len]`` batch on PyTorch's ``meta`` device (shapes only, nothing allocated; weights
are never loaded) with forward hooks that count every module's output, and scale linearly with the rows of a
pass. See :func:`estimate_memory` for the stages and the factors, and ``tests/test_memory.py`` for the check
against measured peaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .engine.core import CHECK_ROWS

__all__ = ["estimate_memory", "auto_chunk_size", "default_budget", "ModelShapes", "model_shapes"]

# Live copies of each activation at the end of a pass's forward, per unit of the module outputs' bytes (see
# estimate_memory's Notes). Fitted to peaks measured on the CPU (tests/test_memory.py) for Llama models.
BODY = {True: 3.0, False: 1.0}          # per_token (forward-mode tangents) or not
HEAD = {True: 4.0, False: 2.0}          # float32 copies of the [L, vocab] log-probabilities
# What the process really takes above the live tensors, per byte of one target pass's activations: an allocator
# keeps the freed blocks of the largest pass (glibc's heap below its dynamic mmap threshold, PyTorch's CUDA caching
# allocator its reserved segments) and reuses only part of them in the stages after it. The CPU's factor is
# fitted to fresh processes with glibc's default settings, 0.9 M to 123 M parameters (benchmarks/memory_measured.py;
# the ratios are in benchmarks/memory_estimates.md, and tests/test_memory.py holds them to +-25 %). CUDA's is not
# measured on this project's machines (no GPU) and assumed from the caching allocator's usual fragmentation:
# benchmarks/gpu_check.py prints the reserved peak beside the estimate where a GPU is lent.
ALLOCATOR_SLACK = {"cpu": 0.7, "cuda": 0.2}
# chunk_size="auto" plans with this fraction of the free memory: the margin covers the largest under-estimate
# measured on the CPU (benchmarks/memory_estimates.md) with room for what else the machine allocates meanwhile
BUDGET_FRACTION = 0.8


@dataclass(frozen=True)
class ModelShapes:
    """What the estimate needs to know about a model, in bytes (``*_row``: per row of a ``[rows, seq_len]``
    pass)."""

    weights: int            # every parameter once (tied ones once)
    gradient: int           # one gradient: the trainable parameters in their dtype
    gradient_acc: int       # one gradient in the engine's accumulation dtype (float32 at least)
    body_row: int           # the outputs of every module (each tensor once)
    owners_row: int         # the outputs of the modules that own trainable parameters (one local tangent each)
    attention_row: int      # SDPA's attention probabilities, all layers and heads, [L, L] (0 if among the outputs)
    head_row: int           # float32 log-probabilities over the vocabulary, [L, vocab]
    seq_len: int
    itemsize: int = 4       # bytes per parameter (2: half precision, where the built-in check runs over every target)


# ------------------------------------------------------------------------------------------ the shapes
def _meta_model(config, dtype):
    """A causal LM built from ``config`` on the meta device: shapes only, no weight ever allocated."""
    from transformers import AutoModelForCausalLM

    try:
        from accelerate import init_empty_weights
    except ImportError:
        init_empty_weights = None
    if init_empty_weights is not None:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # accelerate re-registers each parameter on meta, which unties tied embeddings
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def _model_dtype(model_or_config, dtype):
    if dtype is not None:
        return dtype
    if isinstance(model_or_config, nn.Module):
        return next(model_or_config.parameters()).dtype
    got = getattr(model_or_config, "dtype", None)  # transformers >= 4.56 (torch_dtype before)
    if isinstance(got, str):
        got = getattr(torch, got, None)
    return got if isinstance(got, torch.dtype) else torch.float32


def _distinct_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def _on_meta(model: nn.Module, dtype: torch.dtype):
    """``model``'s own forward, called with meta stand-ins for its parameters and buffers (tied ones stay
    tied): shapes flow, nothing is allocated."""
    stand_in: dict[int, torch.Tensor] = {}

    def meta(t):
        kind = dtype if t.is_floating_point() else t.dtype
        return stand_in.setdefault(id(t), torch.empty(t.shape, dtype=kind, device="meta"))

    values = {n: meta(p) for n, p in model.named_parameters(remove_duplicate=False)}
    values.update({n: meta(b) for n, b in model.named_buffers(remove_duplicate=False)})

    def call(*args, **kwargs):
        return torch.func.functional_call(model, values, args, kwargs, tie_weights=False)

    return call


def _outputs(output) -> list[torch.Tensor]:
    if hasattr(output, "to_tuple"):  # a transformers ModelOutput
        output = output.to_tuple()
    return [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _count_outputs(model: nn.Module, call, seq_len: int) -> tuple[int, int, int, bool]:
    """One meta forward of a ``[1, seq_len]`` batch: bytes of all module outputs (each tensor once), of the
    outputs of modules that own trainable parameters, the vocabulary size (the logits' last dimension) and
    whether attention probabilities (``[..., L, L]``) are among the outputs (eager attention returns them)."""
    seen: dict[int, torch.Tensor] = {}
    counts = {"body": 0, "owners": 0, "square": 0}

    def hook(module, _args, output):
        if module is model:
            return
        for t in _outputs(output):
            nbytes = t.numel() * t.element_size()
            if module in owners:
                counts["owners"] += nbytes
            if id(t) not in seen:
                seen[id(t)] = t  # held, so that ids stay unique until the count is done
                counts["body"] += nbytes
                counts["square"] += t.dim() >= 3 and tuple(t.shape[-2:]) == (seq_len, seq_len)

    owners = {m for m in model.modules() if any(p.requires_grad for p in m._parameters.values() if p is not None)}
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    try:
        with torch.no_grad():
            try:  # a ready [rows, 1, L, L] mask keeps transformers from inspecting the (absent) mask values
                out = call(input_ids=ids, attention_mask=torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool,
                                                                    device="meta"), use_cache=False)
            except (TypeError, ValueError, RuntimeError):
                seen.clear()
                counts.update(body=0, owners=0, square=0)
                out = call(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    logits = getattr(out, "logits", None)
    logits = logits if logits is not None else _outputs(out)[0]
    return counts["body"], counts["owners"], int(logits.shape[-1]), counts["square"] > 0


def _attention(model: nn.Module, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the attention probabilities of all layers and heads for one row (from the model's config)."""
    cfg = getattr(model, "config", None)
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    if not layers or not heads:
        return 0
    return layers * heads * seq_len * seq_len * torch.empty(0, dtype=dtype).element_size()


def model_shapes(model_or_config, seq_len: int, dtype: torch.dtype | None = None) -> ModelShapes:
    """The sizes :func:`estimate_memory` works from, for an ``nn.Module`` (a Hugging Face causal LM) or a
    ``transformers.PretrainedConfig`` (built on the meta device). ``dtype`` overrides the model's."""
    dtype = _model_dtype(model_or_config, dtype)
    model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config, dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    params = _distinct_parameters(model)
    body, owners, vocab, eager = _count_outputs(model, _on_meta(model, dtype), seq_len)
    attention = 0 if eager else _attention(model, seq_len, dtype)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ModelShapes(weights=sum(p.numel() for p in params) * itemsize, gradient=trainable * itemsize,
                       gradient_acc=trainable * (8 if dtype == torch.float64 else 4),
                       body_row=body, owners_row=owners, attention_row=attention,
                       head_row=seq_len * vocab * 4, seq_len=seq_len, itemsize=itemsize)


# ------------------------------------------------------------------------------------------ the estimate
def _pass_row(shapes: ModelShapes, tangents: bool, directions: int) -> int:
    """Bytes per row live at the end of one pass's forward (see estimate_memory's Notes)."""
    # SDPA materialises the attention probabilities only in its math backend, which a pass with tangents uses
    activations = shapes.body_row + (shapes.attention_row if tangents else 0)
    return int(BODY[tangents] * activations + HEAD[tangents] * shapes.head_row + directions * shapes.owners_row)


def _stages(shapes: ModelShapes, n_instances: int, *, per_token: bool, pg: bool, n_terms: int,
            chunk_size: int | None, n_sets: int, n_samples: int, verify: bool) -> tuple[dict[str, int], int]:
    """What each stage of the engine adds on top of the weights at its peak, and the rows of a target pass."""
    g = shapes.gradient
    per_set = math.ceil(n_instances / n_sets) if pg else n_instances  # with pg, a pass never straddles two sets
    rows = max(1, min(per_set, chunk_size or per_set))
    passes = math.ceil(per_set / rows)
    terms = n_terms * g
    # risk gradients during the last set's passes: the sets done, the set's accumulator (from its second pass
    # on) and the previous pass's gradient (still referenced from the third pass on, or after a set of several)
    held = (n_sets - 1 + min(passes - 1, 2)) * g if pg else 0
    kept = (n_sets + (passes > 1)) * g if pg else 0  # what stays once the target passes are done
    stages = {"objective gradient": terms + n_samples * _pass_row(shapes, False, 0),
              # a pass's parameter gradients land at the end of its backward, when its activations are gone
              "target chunk": terms + held + max(rows * _pass_row(shapes, per_token, n_terms), g if pg else 0)}
    if pg:
        stages["PG-effect"] = terms + kept + n_samples * _pass_row(shapes, False, n_sets)
    if verify:  # one plain backward over a few targets, summed into a float32 (at least) gradient
        checked = n_instances if shapes.itemsize == 2 else min(n_instances, CHECK_ROWS)  # core.check_rows
        check_rows = min(chunk_size or checked, checked)
        stages["verify"] = terms + kept + shapes.gradient_acc + g + check_rows * _pass_row(shapes, False, 0)
    return stages, rows


def estimate_memory(model_or_config, n_instances: int, seq_len: int, dtype=None, per_token: bool = True,
                    pg: bool = True, n_terms: int = 2, chunk_size: int | None = None, *, n_sets: int = 2,
                    n_samples: int | None = None, verify: bool = True, device=None) -> dict:
    """Estimated memory of one :func:`geffect_lab.g_effect` call (the fast engine), from shapes alone.

    Parameters
    ----------
    model_or_config : torch.nn.Module or transformers.PretrainedConfig
        A Hugging Face causal LM (its parameters' shapes, dtype and ``requires_grad`` are read; its forward runs
        on meta stand-ins, so nothing is allocated) or its config (the model is built on the meta device; every
        parameter counts as trainable).
    n_instances : int
        Target instances, all sets together (``targeted`` + ``non_targeted``).
    seq_len : int
        Tokens per row (prompt + answer) of the longest instance or sample; a pass is padded to its longest row.
    dtype : torch.dtype, optional
        The model's dtype (default: the parameters', or the config's, else float32).
    per_token, pg : bool
        As in :func:`~geffect_lab.g_effect`: forward-mode tangents for the per-token G-effects; the
        PG-effects, which keep one risk gradient per target set.
    n_terms : int
        Terms of the objective (``"npo+gd"``: 2); each keeps one gradient.
    chunk_size : int, optional
        Target instances per pass (``None``: all at once). With ``pg`` a pass never straddles two sets.
    n_sets : int
        Target sets (default 2: targeted and non-targeted).
    n_samples : int, optional
        Forget (and retain) samples per objective term (default: one target set's size, ``n_instances /
        n_sets``). They go through the model unchunked, for the objective's gradient and the PG-effect.
    verify : bool
        Whether the call runs the engine's built-in check (``verify="first"``, the default, does on a
        measurement's first call).
    device : str or torch.device, optional
        Where the call runs, for the allocator's overhead (default: the model's device; for a config, the GPU
        if there is one, else the CPU).

    Returns
    -------
    dict
        Bytes: ``weights`` (resident before the call), ``objective_gradients`` (``n_terms`` gradients),
        ``risk_gradients`` (with ``pg``, one gradient per target set), ``activations`` (one target pass),
        ``working`` (what the call adds on top of the weights at its peak) and ``peak`` (``weights +
        working``); ``stages`` (each stage's ``working``), ``peak_stage`` (the largest) and ``chunk_size``
        (rows in a target pass). These count live tensors. ``working_resident`` and ``peak_resident`` add what
        the ``device``'s allocator holds beyond them (what a user sees: the process's resident memory on the
        CPU, the reserved memory on a GPU), and ``device`` names the device type they are for.

    Notes
    -----
    The engine runs in up to four stages, one after the other; the peak is the largest. Gradients are in the
    parameters' dtype, ``G`` bytes each.

    1. *Objective gradient*: a forward and backward per term over its ``n_samples`` samples; the term
       gradients (``n_terms × G``) are kept to the end.
    2. *Target chunks*: per chunk of rows, one forward with hooks and one backward over activations, largest
       at the end of the forward. With ``pg`` the backward also yields the chunk's parameter gradient, summed
       per set: during the last set's passes the earlier sets' gradients, the set's accumulator and the
       previous pass's gradient are held (up to ``(n_sets + 1) × G``).
    3. *PG-effect* (``pg``): two passes over the forget samples (their losses for ``sample_effect``, their answer
       log-likelihoods for ``pg_effect``), one after the other, against the ``n_sets`` risk gradients.
    4. *Verify*: one plain forward and backward over a few targets (``CHECK_ROWS``; every target, in chunks,
       in half precision), its gradient (``G``) summed into a float32 one (float64 for a float64 model).

    A pass's activations per row come from a meta forward of ``[1, seq_len]``, and scale with its rows:

    - the outputs of every module, each tensor once, times 1; with ``per_token`` times 3: each activation
      carries a tangent of its own size, and the forward-mode rules of the non-linearities (SiLU, softmax,
      RMSNorm) keep about one more copy until the tangent level closes;
    - one local tangent per direction (``n_terms`` in a target pass, ``n_sets`` in the PG-effect's) of the
      output of each module that owns trainable parameters;
    - with SDPA attention in a pass with tangents (its math backend), the attention probabilities,
      ``layers × heads × L²`` in the model's dtype, counted like a module output (eager attention returns
      them as one; a fused SDPA kernel without tangents keeps none);
    - the float32 log-probabilities over the vocabulary, ``L × vocab`` (an answer may fill the row): 2 copies
      (gathered logits, log-softmax), 4 with tangents.

    The factors were fitted to peaks measured on the CPU (live tensor bytes; ``tests/test_memory.py`` holds
    the estimate to ±30 % of them). An allocator keeps more than the live tensors: freed blocks of the largest
    pass stay with it and are only partly reused by later stages. ``working_resident`` adds
    ``ALLOCATOR_SLACK[device] ×`` one target pass's activations: 0.7 on the CPU, measured with glibc's default
    settings (``benchmarks/memory_measured.py`` and ``tests/test_memory.py`` hold it to ±25 % of the peak
    resident memory of fresh processes); 0.2 on a GPU, not measured here.
    """
    from ._batching import check_number

    for name, value in (("n_instances", n_instances), ("seq_len", seq_len), ("n_terms", n_terms), ("n_sets", n_sets)):
        check_number(name, value, whole=True)
    for name, value in (("chunk_size", chunk_size), ("n_samples", n_samples)):
        check_number(name, value, whole=True, optional=True)
    shapes = model_shapes(model_or_config, seq_len, dtype)
    return _estimate(shapes, n_instances, per_token=per_token, pg=pg, n_terms=n_terms, chunk_size=chunk_size,
                     n_sets=n_sets, n_samples=n_samples, verify=verify,
                     device_type=_device_type(model_or_config, device))


def _device_type(model_or_config, device) -> str:
    """``"cpu"`` or ``"cuda"``: the given device, else the model's, else (a config, a meta model) the GPU if any."""
    if device is None and isinstance(model_or_config, nn.Module):
        device = next(model_or_config.parameters()).device
    kind = torch.device(device).type if device is not None else "meta"
    if kind == "meta":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return kind if kind in ALLOCATOR_SLACK else "cuda"


def _estimate(shapes: ModelShapes, n_instances: int, *, n_samples: int | None, device_type: str, **kwargs) -> dict:
    n_sets = kwargs["n_sets"]
    n_samples = max(1, math.ceil(n_instances / n_sets)) if n_samples is None else n_samples
    stages, rows = _stages(shapes, n_instances, n_samples=n_samples, **kwargs)
    stage = max(stages, key=stages.get)
    g = shapes.gradient
    activations = rows * _pass_row(shapes, kwargs["per_token"], kwargs["n_terms"])
    resident = stages[stage] + int(ALLOCATOR_SLACK[device_type] * activations)
    return {"weights": shapes.weights, "objective_gradients": kwargs["n_terms"] * g,
            "risk_gradients": n_sets * g if kwargs["pg"] else 0, "activations": activations,
            "working": stages[stage], "peak": shapes.weights + stages[stage], "stages": stages,
            "peak_stage": stage, "chunk_size": rows, "device": device_type, "working_resident": resident,
            "peak_resident": shapes.weights + resident}


# ------------------------------------------------------------------------------------------ the chunk size
def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_budget(device: torch.device | str | None = None) -> int:
    """``BUDGET_FRACTION`` (80 %) of the free memory of ``device``: ``torch.cuda.mem_get_info`` on a GPU; on the
    CPU the system's available memory (``psutil`` if installed, else ``MemAvailable`` from ``/proc/meminfo``)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:
            free = _meminfo_available()
        if free is None:
            raise RuntimeError("cannot tell the free memory of this machine; pass budget_bytes=")
    return int(BUDGET_FRACTION * free)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def auto_chunk_size(model, n_instances: int, seq_len: int, *, budget_bytes: int | float | None = None,
                    per_token: bool = True, pg: bool = True, n_terms: int = 2, dtype=None, n_sets: int = 2,
                    n_samples: int | None = None, verify: bool = True, device=None) -> int:
    """The largest ``chunk_size`` (1 … ``n_instances``) whose estimated resident peak (:func:`estimate_memory`'s
    ``peak_resident``: weights and the allocator's overhead included, same keywords) fits ``budget_bytes``.

    ``model`` is a causal LM or its config; ``budget_bytes`` defaults to 80 % of the free memory of the
    model's device (:func:`default_budget`; for a config, of the GPU if there is one). Raises ``ValueError``,
    naming the budget and the least need, when not even one instance per pass fits.
    """
    device_type = _device_type(model, device)
    if budget_bytes is None:
        where = next(model.parameters()).device if device is None and isinstance(model, nn.Module) else device
        budget_bytes = default_budget(None if where is None or torch.device(where).type == "meta" else where)
    shapes = model_shapes(model, seq_len, dtype)

    def plan(chunk: int) -> dict:
        return _estimate(shapes, n_instances, per_token=per_token, pg=pg, n_terms=n_terms, chunk_size=chunk,
                         n_sets=n_sets, n_samples=n_samples, verify=verify, device_type=device_type)

    least = plan(1)
    if least["peak_resident"] > budget_bytes:
        raise ValueError(f"not even chunk_size=1 fits the memory budget of {_size(budget_bytes)}: the estimated "
                         f"peak is {_size(least['peak_resident'])} (weights {_size(least['weights'])}, at the stage "
                         f"{least['peak_stage']!r}; seq_len={seq_len}, per_token={per_token}, pg={pg}, "
                         f"n_terms={n_terms}, verify={verify})")
    # a scan, not a bisection: a chunk just under a set's size also holds the set's accumulator, so the peak
    # is not monotone in the chunk; each estimate is a few multiplications
    return next(c for c in range(max(1, n_instances), 0, -1) if plan(c)["peak_resident"] <= budget_bytes)
