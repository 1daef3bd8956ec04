"""Ghost dot products: per-row, per-layer inner products with fixed parameter-space directions, without
ever materialising a per-row gradient.

For a module with parameters θ_m, output ``y = f(x; θ_m)`` and a direction ``G`` in parameter space, the
row-i gradient's inner product with ``G`` restricted to θ_m is

    ⟨∇_{θ_m} L_i, G_m⟩ = Σ_t ⟨δ_{i,t}, J_{θ_m} f(x_{i,t}) · G_m⟩,      δ = ∂(Σ_i L_i)/∂y

(rows are independent, so the summed loss's output-gradient is each row's own). The factor on the right is
the module *evaluated along the direction*: for a Linear ``G_W x + G_b``, for an Embedding a gather of
``G_E``, for GPT-2's Conv1D ``x G_W + G_b``; any other module with parameters (norms, custom layers) gets a
local forward-mode jvp with respect to its own parameters only.

:class:`GhostPass` runs one forward with hooks that compute these local tangents, and one backward that
only reaches activations (parameters do not require grad during the pass), contracting each module's δ
with its local tangents as they arrive. With ``propagate=True`` the forward runs in forward-mode AD: the
sum of the local tangents is injected into each module's output tangent, so any scalar computed from the
outputs (each answer token's NLL) carries its directional derivative along the total direction — the
per-token G-effects — at the cost of one tangent pass, with no extra backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._batching import eval_mode
from .groups import LayerGroups

__all__ = ["GhostPass", "GhostResult", "engine_mode", "accumulation_dtype"]


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, float32 at least otherwise."""
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _tangent(value: torch.Tensor) -> torch.Tensor:
    tangent = fwAD.unpack_dual(value).tangent
    return torch.zeros_like(value).detach() if tangent is None else tangent.detach()


def _strip(value):
    """The primal of a (possibly dual) tensor, detached."""
    if isinstance(value, torch.Tensor):
        return fwAD.unpack_dual(value).primal.detach()
    return value


@contextmanager
def engine_mode(model: nn.Module, keep_grad: bool = False):
    """Eval mode (no dropout; HF gradient checkpointing is a training-mode feature and stays off) and, unless
    ``keep_grad``, parameters that do not require grad; restored on exit. ``.grad`` is never touched."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        try:
            if not keep_grad:
                for p, _ in flags:
                    p.requires_grad_(False)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


class GhostResult:
    def __init__(self, contrib: torch.Tensor, outputs, param_grads=None):
        self.contrib = contrib          # [row, group, direction]
        self.outputs = outputs          # (row losses, extras' primals, extras' tangents), detached
        self.param_grads = param_grads  # {id(param): ∇ Σ_rows loss} when asked for


class GhostPass:
    """Per-row, per-group inner products of a loss's gradient with fixed directions.

    ``directions`` is a list of D parameter-space directions, each a dict ``id(param) -> tensor`` (missing
    parameters count as zero). :meth:`run` calls ``fn()``, which must run the model's forward pass(es) and
    return ``(row_losses, extras)``: ``row_losses`` [rows] is what gets differentiated (rows must not
    interact), ``extras`` a tuple of tensors whose tangents (along the sum of the directions) are wanted
    when ``propagate`` is true (or the indices of the directions to follow). Every forward inside ``fn`` must
    put its rows in the same order.
    """

    def __init__(self, model: nn.Module, groups: LayerGroups, directions: Sequence[dict[int, torch.Tensor]],
                 propagate: bool | Sequence[int] = False):
        self.model = model
        self.groups = groups
        self.directions = list(directions)
        # which directions the forward-mode tangent follows (their sum): all, none or the listed ones
        self.tangent_dirs = set(range(len(self.directions))) if propagate is True else set(propagate or ())
        self.propagate = bool(self.tangent_dirs)
        self.acc_dtype = accumulation_dtype(model)
        self._busy = False
        self._linear_norm: dict[int, bool] = {}
        self._acc: torch.Tensor | None = None
        # modules that own parameters directly, with (param name, param, group) for each
        self._owners: list[tuple[nn.Module, list[tuple[str, nn.Parameter, int]]]] = []
        for module in model.modules():
            own = [(n, p, groups.of_param[id(p)]) for n, p in module._parameters.items()
                   if p is not None and id(p) in groups.of_param]
            if own:
                self._owners.append((module, own))

    # ------------------------------------------------------------------ local tangents of one module
    def _local(self, module: nn.Module, own, args, kwargs, d: int) -> dict[int, object]:
        """Output tangent of ``module`` along direction ``d``, per group of its own parameters."""
        direction = self.directions[d]
        by_group: dict[int, list[tuple[str, nn.Parameter]]] = {}
        for name, p, g in own:
            by_group.setdefault(g, []).append((name, p))
        out: dict[int, object] = {}
        for g, params in by_group.items():
            grads = {n: direction.get(id(p)) for n, p in params}
            if all(v is None for v in grads.values()):
                continue
            grads = {n: (torch.zeros_like(p) if grads[n] is None else grads[n].to(p.dtype)) for n, p in params}
            names = set(grads)
            if isinstance(module, nn.Linear) and names <= {"weight", "bias"}:
                x = args[0]
                w = grads.get("weight", torch.zeros_like(module.weight))
                out[g] = F.linear(x, w, grads.get("bias"))
            elif _is_conv1d(module) and names <= {"weight", "bias"}:
                x = args[0]
                w = grads.get("weight", torch.zeros_like(module.weight))
                y = x @ w
                out[g] = y + grads["bias"] if "bias" in grads else y
            elif isinstance(module, nn.Embedding) and names == {"weight"}:
                ids = args[0] if args else kwargs["input"]
                out[g] = F.embedding(ids, grads["weight"], module.padding_idx)
            elif (tangent := self._linear_norm_tangent(module, grads, args, kwargs)) is not None:
                out[g] = tangent
            else:
                out[g] = self._local_jvp(module, params, grads, args, kwargs)
        return out

    def _evaluate_with(self, module, values, args, kwargs):
        """The module's output with its own parameters set to ``values`` (the others to zero), no autograd."""
        params = {n: torch.zeros_like(p) for n, p in module._parameters.items() if p is not None}
        params.update(values)
        self._busy = True
        try:
            with torch.no_grad():
                return torch.func.functional_call(module, params, args, kwargs, strict=False)
        finally:
            self._busy = False

    def _linear_norm_tangent(self, module, grads, args, kwargs):
        """The tangent of a norm layer (LayerNorm, RMSNorm, …) along G, or None for any other module. Norms scale
        and shift the normalised input by their parameters, so their output is linear in them and the tangent is
        the layer evaluated with G as its parameters: a plain forward instead of a forward-mode jvp. Checked once
        per module on the first direction: y(2G) = 2·y(G) exactly and y(0) = 0 (a variant like Gemma's
        ``(1 + w)`` fails it and keeps the jvp)."""
        key = id(module)
        known = self._linear_norm.get(key)
        if known is False:
            return None
        if known is None and not ("Norm" in type(module).__name__
                                  and all(p.dim() == 1 for p in module._parameters.values() if p is not None)):
            self._linear_norm[key] = False
            return None
        y = self._evaluate_with(module, grads, args, kwargs)
        if known is None:
            y2 = self._evaluate_with(module, {n: 2 * v for n, v in grads.items()}, args, kwargs)
            y0 = self._evaluate_with(module, {n: torch.zeros_like(v) for n, v in grads.items()}, args, kwargs)
            self._linear_norm[key] = all(torch.equal(b, 2 * a) and not c.any() for a, b, c in
                                         zip(tree_flatten(y)[0], tree_flatten(y2)[0], tree_flatten(y0)[0])
                                         if isinstance(a, torch.Tensor))
        return y if self._linear_norm[key] else None

    def _local_jvp(self, module, params, grads, args, kwargs):
        """Forward-mode jvp of the module with respect to its own parameters (inputs held fixed)."""
        duals = {n: fwAD.make_dual(p.detach(), grads[n]) for n, p in params}
        self._busy = True
        try:
            out = torch.func.functional_call(module, duals, args, kwargs, strict=False)
        finally:
            self._busy = False
        return tree_map(lambda t: fwAD.unpack_dual(t).tangent if isinstance(t, torch.Tensor) else None, out)

    # ------------------------------------------------------------------ hooks
    def _hook(self, own):
        def hook(module, args, kwargs, output):
            if self._busy:
                return None
            p_args, p_kwargs = tree_map(_strip, args), tree_map(_strip, kwargs)
            with torch.no_grad():
                locals_ = [self._local(module, own, p_args, p_kwargs, d) for d in range(len(self.directions))]
            flat_out, spec = tree_flatten(output)
            n_rows = self._acc.shape[0]
            new_flat = []
            for idx, y in enumerate(flat_out):
                if not isinstance(y, torch.Tensor) or not y.is_floating_point():
                    new_flat.append(y)
                    continue
                primal, tangent = fwAD.unpack_dual(y)
                # the local tangents of this output tensor, per (group, direction)
                pieces = []
                for d, loc in enumerate(locals_):
                    for g, t in loc.items():
                        t_i = tree_flatten(t)[0][idx] if not isinstance(t, torch.Tensor) else t
                        if t_i is not None:
                            pieces.append((g, d, t_i.expand_as(primal) if t_i.shape != primal.shape else t_i))
                if not pieces:
                    new_flat.append(y)
                    continue
                if not primal.requires_grad:  # an entry point (embeddings): start the activation graph here
                    primal = primal.detach().requires_grad_(True)
                if primal.shape[0] == 1 and n_rows > 1:
                    # shared by every row (GPT-2's position embeddings): give each row its own view so that
                    # the backward hands back per-row output-gradients
                    primal = primal.expand(n_rows, *primal.shape[1:]).clone()
                    tangent = None if tangent is None else tangent.expand_as(primal).clone()
                    pieces = [(g, d, t.expand_as(primal)) for g, d, t in pieces]
                if primal.shape[0] != n_rows:
                    raise RuntimeError(
                        f"module {type(module).__name__} returned {primal.shape[0]} rows for a batch of {n_rows}: "
                        "the engine needs the batch as the first dimension of every module output")
                if self.propagate:
                    total = sum(t for _, d, t in pieces if d in self.tangent_dirs)
                    if not isinstance(total, int):
                        tangent = (total if tangent is None else tangent + total).detach()
                    y_new = fwAD.make_dual(primal, tangent)
                else:
                    y_new = primal
                y_new.register_hook(self._contract(pieces))
                new_flat.append(y_new)
            return tree_unflatten(new_flat, spec)

        return hook

    def _contract(self, pieces):
        acc = self._acc

        def on_grad(delta: torch.Tensor):
            dd = delta.to(self.acc_dtype)
            for g, d, t in pieces:
                acc[:, g, d] += (dd * t.to(self.acc_dtype)).reshape(dd.shape[0], -1).sum(1).to(acc.device)
            pieces.clear()  # free the local tangents as soon as they are used
            return None

        return on_grad

    # ------------------------------------------------------------------ the pass
    def run(self, fn: Callable[[], tuple[torch.Tensor, tuple]], n_rows: int,
            param_grads: bool = False) -> GhostResult:
        """One pass; with ``param_grads`` the same backward also returns the gradient of the summed row
        losses with respect to the trainable parameters (what a plain backward computes), at the cost of the
        weight-gradient half of a backward."""
        device = next(self.model.parameters()).device
        self._acc = torch.zeros(n_rows, len(self.groups.names), len(self.directions), dtype=self.acc_dtype,
                                device=device)
        with ExitStack() as stack:
            stack.enter_context(engine_mode(self.model, keep_grad=param_grads))
            stack.enter_context(torch.enable_grad())
            if self.propagate:  # only the math SDPA backend has forward-mode derivatives
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            with fwAD.dual_level():
                handles = [m.register_forward_hook(self._hook(own), with_kwargs=True) for m, own in self._owners]
                try:
                    losses, extras = fn()
                finally:
                    for h in handles:
                        h.remove()
                if losses.shape != (n_rows,):
                    raise RuntimeError(f"the pass returned losses of shape {tuple(losses.shape)}, "
                                       f"expected ({n_rows},)")
                tangents = tuple(_tangent(e) for e in extras) if self.propagate else ()
                primals = tuple(fwAD.unpack_dual(e).primal.detach() for e in extras)
                primal_loss = fwAD.unpack_dual(losses).primal
            # The backward runs outside the dual level: saved tensors have shed their tangents by now.
            grads = None
            if param_grads:
                params = [p for p in {id(p): p for p in self.model.parameters()}.values() if p.requires_grad]
                got = torch.autograd.grad(primal_loss.sum(), params, allow_unused=True)
                grads = {id(p): g for p, g in zip(params, got) if g is not None}
            elif primal_loss.requires_grad:
                primal_loss.sum().backward()
        acc, self._acc = self._acc, None
        return GhostResult(acc, (primal_loss.detach(), primals, tangents), grads)
