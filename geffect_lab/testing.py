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

__all__ = ["tiny_model", "relative_error", "float64_exact_norms", "reorder_tolerance", "assert_effects_close"]


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
