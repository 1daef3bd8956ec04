"""Helpers for testing geffect-lab and objectives built on it: tiny random models and comparisons.

>>> model = tiny_model("llama", vocab_size=len(tok))          # float64, eager attention, seeded
>>> fast = gl.g_effect(model, tok, "npo", forget=f, targets=t)
>>> slow = gl.g_effect(model, tok, "npo", forget=f, targets=t, engine="reference")
>>> assert relative_error(fast.g_effect, slow.g_effect) < 1e-9
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["tiny_model", "relative_error", "float64_exact_norms", "float64_throughout", "reorder_tolerance",
           "assert_effects_close", "tiny_causal_lm", "NotInstantiable", "computes_below_float64",
           "check_against_oracle", "architecture_outcome"]


def tiny_model(arch: str = "llama", vocab_size: int = 1024, *, hidden: int = 32, layers: int = 2, seed: int = 0,
               dtype: torch.dtype = torch.float64, attn_implementation: str = "eager"):
    """A small random causal LM (``"llama"`` with grouped-query attention, ``"gpt2"`` with tied embeddings,
    ``"gpt_neox"`` for the generic layer rule), in eval mode."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            attn_implementation=attn_implementation, **special))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn_implementation, **special))
    elif arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=256, attn_implementation=attn_implementation,
            hidden_dropout=0.0, attention_dropout=0.0, **special))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use llama, gpt2 or gpt_neox")
    return model.to(dtype).eval()


def relative_error(actual, expected) -> float:
    """``max |actual − expected| / max |expected|`` over all entries (NaNs, e.g. past an answer's end, must
    sit at the same places and are ignored)."""
    a = np.asarray(getattr(actual, "values", actual), dtype=np.float64)
    b = np.asarray(getattr(expected, "values", expected), dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        raise AssertionError("NaNs at different places")
    a, b = np.nan_to_num(a), np.nan_to_num(b)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max())


def reorder_tolerance(dtype: torch.dtype = torch.float64, ulps: int = 64) -> float:
    """The relative tolerance for one quantity computed by two paths that sum in a different order (rows batched
    differently, a different BLAS kernel on another CPU): ``ulps`` units of the dtype's machine epsilon. Paths
    that compute in a different order never agree bitwise on every machine; compare them with this."""
    return ulps * torch.finfo(dtype).eps


def assert_effects_close(actual, expected, rtol: float = 1e-9, name: str = "values") -> None:
    """Assert ``relative_error(actual, expected) <= rtol``; on failure name the worst entry by its coordinates
    (instance × layer × term for a G-effect) with both values. Hidden from pytest's tracebacks."""
    __tracebackhide__ = True
    err = relative_error(actual, expected)
    if err <= rtol:
        return
    a = np.nan_to_num(np.asarray(getattr(actual, "values", actual), dtype=np.float64))
    b = np.nan_to_num(np.asarray(getattr(expected, "values", expected), dtype=np.float64))
    worst = np.unravel_index(int(np.abs(a - b).argmax()), a.shape)
    dims = getattr(actual, "dims", tuple(f"axis{i}" for i in range(a.ndim)))
    where = []
    for dim, i in zip(dims, worst):
        coords = getattr(actual, "coords", {})
        label = coords[dim].values[i] if dim in coords else i
        where.append(f"{dim}={label}")
    raise AssertionError(f"{name}: relative error {err:.3g} > {rtol:.3g}; worst at {', '.join(where)}: "
                         f"{a[worst]!r} vs {b[worst]!r}")


@contextmanager
def float64_exact_norms():
    """Inside this context Llama-family RMSNorms keep the input's dtype (HF computes them in float32 even in a
    float64 model, which limits any float64 comparison of forward-mode and reverse-mode derivatives to
    ~1e-8). Use with ``attn_implementation="sdpa"`` (eager Llama attention also softmaxes in float32)."""
    from transformers.models.llama import modeling_llama

    cls = modeling_llama.LlamaRMSNorm
    original = cls.forward

    def forward(self, hidden_states):
        if hidden_states.dtype != torch.float64:
            return original(self, hidden_states)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


@contextmanager
def float64_throughout():
    """Inside this context a float64 tensor is never cast down to float32: ``.float()``, ``.to(torch.float32)``
    and ``dtype=torch.float32`` arguments (HF's norms, eager softmaxes and MoE routers "for stability") keep it
    in float64, in any architecture. Two exact paths through such a model then agree to ~1e-15 instead of ~1e-8.
    A test device only: it intercepts every torch call."""
    from torch.overrides import TorchFunctionMode

    def up(value):
        return torch.float64 if value is torch.float32 else value

    class KeepFloat64(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and first.dtype == torch.float64:
                if func is torch.Tensor.float:
                    return first
                args = (first, *map(up, args[1:])) if func is torch.Tensor.to else args
                kwargs = {k: up(v) if k == "dtype" else v for k, v in kwargs.items()}
            return func(*args, **kwargs)

    with KeepFloat64():
        yield


# ---------------------------------------------------------------------------------------------------------------
# tiny random models of any architecture in transformers' causal-LM mapping

_SMALL = dict(hidden_size=32, n_embd=32, d_model=32, num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2,
              num_attention_heads=4, n_head=4, num_heads=4, num_key_value_heads=2, intermediate_size=64, ffn_dim=64,
              n_inner=64, d_ff=64, head_dim=8, rotary_dim=4, max_position_embeddings=256, n_positions=256,
              num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=32, shared_expert_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16,
              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              decoder_layers=2, encoder_layers=2, decoder_ffn_dim=64, encoder_ffn_dim=64, decoder_attention_heads=4,
              encoder_attention_heads=4, decoder_start_token_id=2, n_ctx=256)
# the same without the per-head sizes (for models that derive them, or constrain them together)
_SAFER = {k: v for k, v in _SMALL.items() if k not in ("head_dim", "rotary_dim", "num_key_value_heads", "kv_lora_rank",
                                                       "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                                                       "v_head_dim")}
_TIERS = (_SMALL, {**_SMALL, "num_key_value_heads": 4}, _SAFER,
          dict(num_hidden_layers=2, n_layer=2, num_layers=2, decoder_layers=2))


class NotInstantiable(Exception):
    """An architecture that cannot be built small, offline, on this CPU (the reason is the message)."""


def _overrides(config_dict: dict, sizes: dict, vocab_size: int) -> dict:
    over = {k: v for k, v in sizes.items() if k in config_dict}
    layers = next((over[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in over), None)
    for key in ("layer_types", "block_types", "attn_layer_types"):  # per-layer lists follow the depth
        if layers and isinstance(config_dict.get(key), list) and len(config_dict[key]) > layers:
            over[key] = config_dict[key][:layers]
    over.update({k: vocab_size for k in config_dict if k.endswith("vocab_size") and isinstance(config_dict[k], int)})
    for sub in ("text_config", "decoder", "language_config"):
        if isinstance(config_dict.get(sub), dict):
            over[sub] = {**config_dict[sub], **_overrides(config_dict[sub], sizes, vocab_size)}
    return over


def tiny_causal_lm(model_type: str, vocab_size: int, *, dtype: torch.dtype = torch.float64, seed: int = 0,
                   max_parameters: int = 3_000_000):
    """A small random model of ``model_type`` (a key of transformers' causal-LM mapping), eager attention and
    eager experts, in eval mode: its config shrunk (2 layers, width 32, 4 heads, …), falling back to fewer
    overrides where the architecture constrains its sizes together; the first that runs a forward is kept.
    Raises :class:`NotInstantiable` with the reason when none does (remote code, optional kernels, …)."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        base = AutoConfig.for_model(model_type).to_dict()
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot be built", with its reason
        raise NotInstantiable(f"config: {type(err).__name__}: {err}") from err
    reasons = []
    for sizes in _TIERS:
        try:
            config = AutoConfig.for_model(model_type, **_overrides(base, sizes, vocab_size))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.device("meta"):  # count first, allocate nothing
                    n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
                if n > max_parameters:
                    raise NotInstantiable(f"{n} parameters even when shrunk")
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                         experts_implementation="eager")
            model = model.to(dtype).eval()
            ids = torch.randint(3, vocab_size, (2, 6))
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            return model
        except Exception as err:  # noqa: BLE001
            reasons.append(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
    raise NotInstantiable(reasons[-1] if len(set(reasons)) == 1 else " | ".join(reasons))


def computes_below_float64(model) -> bool:
    """Whether a forward of this float64 model runs any op in a lower float dtype (HF computes norms, softmaxes
    and MoE routers in float32 even in a float64 model): then two exact paths agree to ~1e-8, not ~1e-15."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Watch(TorchDispatchMode):
        low = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.low = self.low or any(isinstance(t, torch.Tensor) and t.is_floating_point()
                                       and t.dtype != torch.float64 for t in tree_flatten(out)[0])
            return out

    ids = torch.randint(3, model.get_input_embeddings().weight.shape[0], (2, 6))
    with torch.no_grad(), Watch() as watch:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return watch.low


class OracleError(RuntimeError):
    """The per-instance oracle itself cannot run on a model (plain autograd fails)."""


def check_against_oracle(model, tokenizer, objective="npo+gd", *, forget, targets, retain=None,
                         tolerance: float | None = None, **kwargs) -> dict:
    """Your own model against the per-instance oracle: ``{"status": "exact" | "refused" | "WRONG", ...}`` with
    the relative errors of ``g_effect``, ``pg_effect``, ``sample_effect`` and ``g_effect_token`` (the fast engine,
    its built-in check on, against ``engine="reference"``) or the refusal. ``tolerance`` defaults to 1e-9, or 1e-6
    when the model computes some ops below float64 (:func:`computes_below_float64`). Use a float64 copy of a small
    model of your architecture: the oracle takes one backward per instance and per answer token."""
    from .engine.api import g_effect
    from .engine.core import EngineCheckError
    from .engine.ghost import UnsupportedModuleError
    from .engine.groups import ModelStructureError

    args = dict(forget=forget, targets=targets, retain=retain, chunk_size=4, **kwargs)
    try:
        ref = g_effect(model, tokenizer, objective, engine="reference", **args)
    except ModelStructureError as err:  # no layer groups: a refusal by name, for the oracle as for the engine
        return {"status": "refused", "detail": f"{type(err).__name__}: {err}"}
    except Exception as err:  # noqa: BLE001 - re-raised, marked as the oracle's
        raise OracleError(f"the per-instance oracle (plain autograd) fails on this model: {type(err).__name__}: "
                          f"{err}") from err
    try:
        fast = g_effect(model, tokenizer, objective, **args)
    except (UnsupportedModuleError, EngineCheckError, ModelStructureError) as err:
        return {"status": "refused", "detail": f"{type(err).__name__}: {err}"}
    if tolerance is None:
        tolerance = 1e-6 if computes_below_float64(model) else 1e-9
    errors = {k: relative_error(fast[k], ref[k]) for k in ("g_effect", "pg_effect", "sample_effect", "g_effect_token")}
    return {"status": "exact" if max(errors.values()) <= tolerance else "WRONG", "errors": errors,
            "tolerance": tolerance, "detail": ""}


def architecture_outcome(model_type: str, seconds: int = 60) -> dict:
    """Build ``model_type`` small (:func:`tiny_causal_lm`, float64) and hold it to the oracle on the bundled
    world with :func:`check_against_oracle`: ``{"model_type", "status", "detail", "parameters", "errors",
    "seconds"}``, status ``exact`` / ``refused`` / ``WRONG`` / ``CRASH`` / ``not instantiable``. At most
    ``seconds`` per architecture (SIGALRM; main thread only)."""
    import signal
    import time
    import warnings

    from transformers import AutoTokenizer

    from .data import data_dir, load_world

    class TooSlow(Exception):
        pass

    def alarm(*_):
        raise TooSlow(f"more than {seconds} s on one CPU core at this size")

    tok = AutoTokenizer.from_pretrained(data_dir() / "tokenizer")
    world = load_world()
    # one long answer and short ones, so that batches are padded; few tokens: the oracle takes one backward
    # per answer token
    data = dict(forget=world["forget01"][:1] + world["world_facts"][:1], retain=world["retain_perturbed"][:1],
                targets={"targeted": world["forget01"][2:3] + world["world_facts"][1:2],
                         "non_targeted": world["world_facts"][60:61]})
    out = {"model_type": model_type, "status": "", "detail": "", "parameters": 0, "errors": None}
    start = time.perf_counter()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tiny_causal_lm(model_type, len(tok))
            out["parameters"] = sum(p.numel() for p in model.parameters())
            try:
                out.update(check_against_oracle(model, tok, **data))
            except OracleError as err:
                out.update(status="not instantiable", detail=str(err))
            if out["status"] == "refused":
                types = {type(m).__qualname__ for m in model.modules()}
                if not any(t in out["detail"] for t in types):
                    out["status"] = "CRASH"  # a refusal must name a module type of the model
    except (NotInstantiable, TooSlow) as err:
        out.update(status="not instantiable", detail=str(err))
    except Exception as err:  # noqa: BLE001 - a crash of the fast engine is not a refusal by name
        out.update(status="CRASH", detail=f"{type(err).__name__}: {err}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out["seconds"] = time.perf_counter() - start
    return out
