"""Fused mixture-of-experts modules: transformers' ``@use_experts_implementation`` classes (Mixtral, Qwen-MoE,
OLMoE, DeepSeek-V3, … ), which hold every expert's weights in two 3-D parameters and run them by an
implementation chosen at load time (``"grouped_mm"`` by default, ``"eager"`` the class's own loop).

Torch's grouped matmul has no forward-mode rule and no float64 kernel, so the generic path (a jvp of the module)
refuses these modules in float32 and cannot run them in float64. Their tangent along a parameter direction has
a closed form instead (:func:`fused_experts_tangent`), computed by a loop over the experts, in any dtype.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["is_fused_experts", "fused_experts_applies", "fused_experts_tangent", "forward_mode_experts",
           "check_experts_dtype"]

# the implementations of transformers' experts interface whose ops torch can run in float64 and in forward mode
# (a loop of linear maps; batched matmuls; None is the class's own loop); grouped_mm, deepgemm and sonicmoe have
# neither
_DIFFERENTIABLE = (None, "eager", "batched_mm")


@functools.cache
def _formula_source() -> str | None:
    """The eager forward the closed formula is written for: Mixtral's loop over the experts hit."""
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return _eager_source(MixtralExperts)


def _eager_source(kind: type) -> str | None:
    wrapped = getattr(getattr(kind, "forward", None), "__wrapped__", None)  # the decorator keeps the class's own
    try:
        return inspect.getsource(wrapped) if wrapped is not None else None
    except (OSError, TypeError):
        return None


@functools.cache
def is_fused_experts(kind: type) -> bool:
    """Whether ``kind`` computes exactly what the formula is written for: its own (eager) forward is Mixtral's,
    character for character, and its gate is the default ``act(gate) * up`` (GPT-OSS clamps, so it is not);
    a subclass is not (it may change what the forward reads).
    Source identity is the proof: the same code on the same attributes is the same function; 57 classes of
    transformers 5.25 pass (Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, PhiMoE, GraniteMoE, Jamba, …)."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover
        return False
    reference = _formula_source()
    # the decorated class itself (the decorator sets ``forward`` on it), never a subclass that inherits it
    return (reference is not None and "forward" in vars(kind) and _eager_source(kind) == reference
            and getattr(kind, "_apply_gate", None) is _default_apply_gate)


def fused_experts_applies(module: nn.Module) -> bool:
    """The layout the eager loop assumes (the decorator's flags, set per instance): ``[gate; up]`` concatenated
    in ``gate_up_proj`` [expert, 2·inter, hidden], ``down_proj`` [expert, hidden, inter], no biases, no norm after
    the experts, not split across devices by expert parallelism."""
    return (getattr(module, "has_gate", False) and getattr(module, "is_concatenated", False)
            and not getattr(module, "has_bias", True) and not getattr(module, "is_transposed", True)
            and not getattr(module, "has_post_expert_norm", True) and not getattr(module, "_is_expert_parallel", True))


def _routing(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    return tuple(args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))


def _activation_jvp(act: nn.Module, x: torch.Tensor, tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(x)`` and its derivative along ``tangent``. The activation is elementwise (transformers' ``ACT2FN``),
    so its Jacobian is diagonal and the vector-Jacobian product with ``tangent`` is the Jacobian-vector one: one
    small backward, which, unlike a jvp, also works inside the pass's own forward-mode level."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = act(x)
        (dy,) = torch.autograd.grad(y, x, grad_outputs=tangent)
    return y.detach(), dy


def fused_experts_tangent(module, grads, args, kwargs):
    """The experts' output tangent along ``G = (G_U, G_D)``. Token t goes to experts e_tk with weights w_tk:

        y_t = Σ_k w_tk · D_e h,   h = act(g) ⊙ u,   [g; u] = U_e x_t
        ẏ_t = Σ_k w_tk · (G_D,e h + D_e ḣ),   ḣ = act'(g) ⊙ ġ ⊙ u + act(g) ⊙ u̇,   [ġ; u̇] = G_U,e x_t

    — like a Linear's tangent, restricted to the tokens routed to each expert and weighted as the module weights
    them (the routing is an input: its own dependence on the router's parameters is the router's share). Contracted
    with δ_t, G_D's part is ``⟨Σ_t w δ_t hᵀ, G_D,e⟩``: the expert's weight gradient, a sum over its tokens. One loop
    over the experts hit, in the model's dtype (float64 included)."""
    x, index, weights = _routing(args, kwargs)
    # a frozen one (an adapter elsewhere, or only the down projections trained) is not in the direction: zero
    up_dir = grads["gate_up_proj"] if "gate_up_proj" in grads else torch.zeros_like(module.gate_up_proj)
    down_dir = grads["down_proj"] if "down_proj" in grads else torch.zeros_like(module.down_proj)
    out = torch.zeros_like(x)
    for e in index.unique().tolist():
        if e >= module.num_experts:  # an expert-parallel sentinel: no expert here
            continue
        token, k = torch.where(index == e)
        xe = x[token]
        g, u = F.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
        dg, du = F.linear(xe, up_dir[e]).chunk(2, dim=-1)
        a, da = _activation_jvp(module.act_fn, g, dg)
        tangent = F.linear(a * u, down_dir[e]) + F.linear(da * u + a * du, module.down_proj[e])
        out.index_add_(0, token, (tangent * weights[token, k, None]).to(out.dtype))
    return out


def _switchable(module: nn.Module) -> bool:
    """A module of a ``@use_experts_implementation`` class: it runs whatever implementation its config names."""
    return hasattr(module, "has_gate") and hasattr(getattr(module, "config", None), "_experts_implementation")


def _experts_configs(model: nn.Module) -> list:
    """The configs the model's experts read their implementation from, each once, where every module reading it
    has the closed formula (a config shared with an experts class without it is never switched)."""
    verdict: dict[int, tuple[object, bool]] = {}
    for m in model.modules():
        if _switchable(m):
            ok = is_fused_experts(type(m)) and fused_experts_applies(m)
            config, before = verdict.get(id(m.config), (m.config, True))
            verdict[id(m.config)] = (config, before and ok)
    return [config for config, ok in verdict.values() if ok]


@contextmanager
def forward_mode_experts(model: nn.Module):
    """Within the block, experts with the closed formula run their class's eager loop where their implementation
    has no forward-mode derivative (per-token tangents carry one through the whole model), restored on exit. For
    them the eager loop and the grouped or batched matmuls are the same function, summed in another order; not so
    for every class (one with its own ``_apply_gate`` keeps Mixtral's inline gate in its eager loop), so no other
    class is switched: without forward mode it is refused by name."""
    switched = [(c, c._experts_implementation) for c in _experts_configs(model)
                if c._experts_implementation not in _DIFFERENTIABLE]
    for config, _ in switched:
        config._experts_implementation_internal = "eager"  # what the modules read, not the sub-configs too
    try:
        yield
    finally:
        for config, implementation in switched:
            config._experts_implementation_internal = implementation


def check_experts_dtype(model: nn.Module) -> None:
    """Refuse by name a float64 model whose experts run torch's grouped matmul, which has no float64 kernel (the
    forward would fail deep inside torch), with the fix."""
    for name, module in model.named_modules():
        if not _switchable(module):
            continue
        implementation = module.config._experts_implementation
        weight = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
        if isinstance(weight, torch.Tensor) and weight.dtype == torch.float64 and implementation not in _DIFFERENTIABLE:
            raise ValueError(
                f"module {name!r} ({type(module).__qualname__}) runs its experts with experts_implementation="
                f"{implementation!r}, which has no float64 kernel: load the model with experts_implementation="
                "'eager' or call model.set_experts_implementation('eager') (transformers' loop over the experts, which "
                "runs in float64)")
