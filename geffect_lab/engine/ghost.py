"""Ghost dot products: per-row, per-layer inner products with fixed parameter-space directions, without
ever materialising a per-row gradient.

For a module with parameters θ_m, output ``y = f(x; θ_m)`` and a direction ``G`` in parameter space, the
row-i gradient's inner product with ``G`` restricted to θ_m is

    ⟨∇_{θ_m} L_i, G_m⟩ = Σ_t ⟨δ_{i,t}, J_{θ_m} f(x_{i,t}) · G_m⟩,      δ = ∂(Σ_i L_i)/∂y

(rows are independent, so the summed loss's output-gradient is each row's own). The factor on the right is
the module *evaluated along the direction*: for a Linear ``G_W x + G_b``, for an Embedding a gather of
``G_E``, for GPT-2's Conv1D ``x G_W + G_b``, for fused MoE experts a sum of such terms over the experts each
token is routed to (:mod:`.experts`); any other module with parameters (norms, custom layers) gets a
local forward-mode jvp with respect to its own parameters only.

:class:`GhostPass` runs one forward with hooks that compute these local tangents, and one backward that
only reaches activations (parameters do not require grad during the pass), contracting each module's δ
with its local tangents as they arrive. With ``propagate=True`` the forward runs in forward-mode AD: the
sum of the local tangents is injected into each module's output tangent, so any scalar computed from the
outputs (each answer token's NLL) carries its directional derivative along the total direction — the
per-token G-effects — at the cost of one tangent pass, with no extra backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._batching import eval_mode, trainable_parameters
from .experts import forward_mode_experts, fused_experts_applies, fused_experts_tangent, is_fused_experts
from .groups import LayerGroups

__all__ = ["GhostPass", "GhostResult", "engine_mode", "accumulation_dtype", "FAST_TANGENTS", "FastTangent",
           "UnsupportedModuleError"]


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, float32 at least otherwise."""
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


class FastTangent(NamedTuple):
    """A closed-form tangent ``J_θ f(x) · G`` for one exact module type (never its subclasses, which may change
    the forward: Gemma's scaled word embedding is an ``nn.Embedding`` subclass that multiplies by √d)."""

    names: frozenset[str]                  # the parameter names the formula covers
    tangent: Callable                      # (module, {name: G}, args, kwargs) -> output tangent
    applies: Callable[[nn.Module], bool]   # extra conditions on the instance (e.g. no max_norm)


def _input(args, kwargs, name: str = "input"):
    return args[0] if args else kwargs[name]


def _linear(module, grads, args, kwargs):        # y = x Wᵀ + b  →  x G_Wᵀ + G_b
    return F.linear(_input(args, kwargs), grads.get("weight", torch.zeros_like(module.weight)), grads.get("bias"))


def _conv1d(module, grads, args, kwargs):        # GPT-2's Conv1D: y = x W + b  →  x G_W + G_b
    y = _input(args, kwargs, "x") @ grads.get("weight", torch.zeros_like(module.weight))
    return y + grads["bias"] if "bias" in grads else y


def _embedding(module, grads, args, kwargs):     # y = E[ids]  →  G_E[ids], 0 where ids = padding_idx
    ids = _input(args, kwargs)
    y = F.embedding(ids, grads["weight"])
    if module.padding_idx is None:
        return y
    # torch's backward gives the padding row no gradient from a lookup (its forward-mode rule does, unmasked):
    # a token equal to padding_idx contributes nothing, as in the plain backward that defines the G-effect
    return y.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)


def _padding_row_dropped(module: nn.Module, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The direction an ``nn.Embedding`` subclass's jvp must follow: its padding row zeroed. The lookup's
    backward never gives that row a gradient, but forward mode evaluates ``G[ids]`` unmasked, so without this a
    token equal to ``padding_idx`` with a gradient on its output (OPT's pad id 1 is the bundled tokenizer's BOS;
    its tied ``lm_head`` makes the row's direction non-zero) would carry a share the backward does not have."""
    if not isinstance(module, nn.Embedding) or module.padding_idx is None or "weight" not in grads:
        return grads
    row = torch.tensor([module.padding_idx], device=grads["weight"].device)
    return {**grads, "weight": grads["weight"].index_fill(0, row, 0)}


def _always(module) -> bool:
    return True


def hookable(output: torch.Tensor) -> torch.Tensor:
    """Where a module output's gradient hook goes: a fresh copy, not the output itself (a view): a view modified in
    place downstream (Falcon's ``mlp_output += attention_output``) leaves the graph with its hook, which would
    then never fire. The original output is freed, so the copy costs no memory."""
    return output.clone()


FAST_TANGENTS: dict[type, FastTangent] = {
    nn.Linear: FastTangent(frozenset({"weight", "bias"}), _linear, _always),
    # max_norm renormalises the looked-up rows, which is not linear in the weight
    nn.Embedding: FastTangent(frozenset({"weight"}), _embedding, lambda m: m.max_norm is None),
}
try:  # transformers' Conv1D (GPT-2 family), by its exact type
    from transformers.pytorch_utils import Conv1D as _HFConv1D

    FAST_TANGENTS[_HFConv1D] = FastTangent(frozenset({"weight", "bias"}), _conv1d, _always)
except ImportError:  # pragma: no cover - transformers is a dependency
    pass

_FUSED_EXPERTS = FastTangent(frozenset({"gate_up_proj", "down_proj"}), fused_experts_tangent, fused_experts_applies)


def _fast_tangent(kind: type) -> FastTangent | None:
    """The closed formula for this exact module type, if any: a registered type, or a fused experts class whose
    forward is the one the experts formula is written for (transformers has dozens, found on first sight)."""
    fast = FAST_TANGENTS.get(kind)
    if fast is None and is_fused_experts(kind):
        fast = FAST_TANGENTS[kind] = _FUSED_EXPERTS
    return fast


# norm layers: exact types whose output is linear in their parameters; other classes named like a norm are
# admitted after the checks of GhostPass._linear_norm_tangent
LINEAR_NORMS = (nn.LayerNorm, nn.RMSNorm)
# Each module's verdict (linear in its parameters or not), taken at its first call and kept for the module's life:
# a recorded run makes a pass per chunk per step, and re-checking every norm layer cost ~5 % of a measurement
_LINEAR_NORM_VERDICTS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _norm_candidate(module: nn.Module) -> bool:
    params = [p for p in module._parameters.values() if p is not None]
    named = type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
    return bool(params) and (type(module) in LINEAR_NORMS or named) and all(p.dim() == 1 for p in params)


def _innermost_module(err: BaseException) -> nn.Module | None:
    """The innermost module whose ``forward`` the traceback of ``err`` passes through."""
    found, tb = None, err.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and tb.tb_frame.f_code.co_name == "forward":
            found = candidate
        tb = tb.tb_next
    return found


# model -> (its module names, [(never-called owner, the ancestor that adopts its parameters)]) by qualified name;
# weak keys, names as values, so that nothing here keeps a model alive
_ADOPTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class UnsupportedModuleError(ValueError):
    """A module the engine cannot evaluate along a direction (named, with its type, in the message)."""


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
        self._linear_norm = _LINEAR_NORM_VERDICTS
        self._acc: torch.Tensor | None = None
        self._flat_rows = 0  # rows x tokens of the model call in progress (for modules on flattened tokens)
        self._module_names = {id(m): n for n, m in model.named_modules()}
        # modules that own parameters directly, with (param name, param, group) for each
        self._owners: list[tuple[nn.Module, list[tuple[str, nn.Parameter, int]]]] = []
        for module in model.modules():
            inner = {id(p) for child in module.children() for p in child.parameters()}
            # a parameter registered on a module and again inside one of its children (BERT's decoder bias) is
            # used through the child: its contribution is taken there only, never twice
            own = [(n, p, groups.of_param[id(p)]) for n, p in module._parameters.items()
                   if p is not None and id(p) in groups.of_param and id(p) not in inner]
            if own:
                self._owners.append((module, own))
        self._adopted = False

    def _adopt_parameters_used_by_ancestors(self, fn) -> None:
        """Some models use a child's parameter without calling the child (Mamba's mixer computes
        ``self.dt_proj.weight @ x``): the child's hook never fires and its share would be lost. One probe pass
        (forward and backward, once per model) finds the owners that are never called yet whose parameters get a
        gradient; each is handed to its nearest ancestor that is called, whose local jvp then covers them."""
        self._adopted = True
        names = tuple(self._module_names.values())
        known = _ADOPTIONS.get(self.model)
        if known is None or known[0] != names:  # first use, or the model's structure changed since
            known = _ADOPTIONS[self.model] = (names, self._probe(fn))
        modules = dict(self.model.named_modules())
        by_module = {id(m): (m, own) for m, own in self._owners}
        for child_name, ancestor_name in known[1]:
            child, own = by_module.pop(id(modules[child_name]))
            ancestor = modules[ancestor_name]
            prefix = child_name[len(ancestor_name) + 1:] if ancestor_name else child_name
            moved = [(f"{prefix}.{n}", p, g) for n, p, g in own]
            if id(ancestor) in by_module:
                by_module[id(ancestor)][1].extend(moved)
            else:
                by_module[id(ancestor)] = (ancestor, moved)
        self._owners = list(by_module.values())

    def _probe(self, fn) -> list[tuple[str, str]]:
        called: set[int] = set()
        handles = [m.register_forward_pre_hook(lambda m, *_: called.add(id(m))) for m in self.model.modules()]
        try:
            with engine_mode(self.model), torch.no_grad():
                fn()  # which owners are called at all (cheap)
            silent = [(m, own) for m, own in self._owners if id(m) not in called]
            params = [p for _, own in silent for _, p, _ in own if p.requires_grad]
            got = {}
            if params:  # which of the silent ones still get a gradient
                with engine_mode(self.model, keep_grad=True), torch.enable_grad():
                    losses, _ = fn()
                    if losses.requires_grad:
                        got = dict(zip(map(id, params), torch.autograd.grad(losses.sum(), params, allow_unused=True)))
        finally:
            for h in handles:
                h.remove()
        parents = {id(c): m for m in self.model.modules() for c in m.children()}
        out = []
        for module, own in silent:
            if not any(got.get(id(p)) is not None for _, p, _ in own):
                continue  # unused: nothing to attribute
            ancestor = parents.get(id(module))
            while ancestor is not None and id(ancestor) not in called:
                ancestor = parents.get(id(ancestor))
            if ancestor is None:
                raise UnsupportedModuleError(
                    f"the parameters of {self._module_names.get(id(module), '?')!r} ({type(module).__qualname__}) get "
                    "a gradient, but neither the module nor any module above it is called in the forward pass")
            out.append((self._module_names[id(module)], self._module_names[id(ancestor)]))
        return out

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
            if any("." in n for n in grads):  # adopted from a child: the module's forward, by forward mode
                out[g] = self._local_jvp(module, params, grads, args, kwargs)
                continue
            fast = _fast_tangent(type(module))
            if fast is not None and set(grads) <= fast.names and fast.applies(module):
                out[g] = fast.tangent(module, grads, args, kwargs)
            elif (tangent := self._linear_norm_tangent(module, grads, args, kwargs)) is not None:
                out[g] = tangent
            else:
                out[g] = self._local_jvp(module, params, _padding_row_dropped(module, grads), args, kwargs)
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
        """The tangent of a norm layer along G, or None for any other module. ``nn.LayerNorm`` and ``nn.RMSNorm``
        scale and shift the normalised input by their parameters, so their output is linear in them and the
        tangent is the layer evaluated with G as its parameters: a plain forward instead of a jvp. A class of
        another library named like a norm (``LlamaRMSNorm``, …) with only vector parameters is admitted once it
        passes, on its first call, y(0) = 0 and y(2G) = 2·y(G) bitwise, and y(G + H) = y(G) + y(H) for a random
        H to a few ulps (a variant like Gemma's ``(1 + w)`` fails the first and keeps the jvp)."""
        known = self._linear_norm.get(module)
        if known is False:
            return None
        if known is None and not _norm_candidate(module):
            self._linear_norm[module] = False
            return None
        y = self._evaluate_with(module, grads, args, kwargs)
        if known is None:
            self._linear_norm[module] = (type(module) in LINEAR_NORMS
                                         or self._passes_linearity(module, grads, y, args, kwargs))
        return y if self._linear_norm[module] else None

    def _passes_linearity(self, module, grads, y, args, kwargs) -> bool:
        def flat(out):
            return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]

        gen = torch.Generator(device="cpu").manual_seed(0)
        other = {n: torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v) for n, v in grads.items()}
        y2 = self._evaluate_with(module, {n: 2 * v for n, v in grads.items()}, args, kwargs)
        y0 = self._evaluate_with(module, {n: torch.zeros_like(v) for n, v in grads.items()}, args, kwargs)
        yh = self._evaluate_with(module, other, args, kwargs)
        ys = self._evaluate_with(module, {n: v + other[n] for n, v in grads.items()}, args, kwargs)
        tol = 64 * torch.finfo(y.dtype if isinstance(y, torch.Tensor) else torch.float32).eps
        for a, b, c, h, sm in zip(flat(y), flat(y2), flat(y0), flat(yh), flat(ys)):
            if not (torch.equal(b, 2 * a) and not c.any()):
                return False
            scale = max(float((a.abs() + h.abs()).max()), 1e-300)
            if float((sm - a - h).abs().max()) > tol * scale:
                return False
        return True

    def _local_jvp(self, module, params, grads, args, kwargs):
        """Forward-mode jvp of the module with respect to its own parameters (inputs held fixed)."""
        duals = {n: fwAD.make_dual(p.detach(), grads[n]) for n, p in params}
        self._busy = True
        try:
            out = torch.func.functional_call(module, duals, args, kwargs, strict=False)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            raise UnsupportedModuleError(
                f"module {self._module_names.get(id(module), '?')!r} ({type(module).__module__}."
                f"{type(module).__qualname__}) cannot be evaluated along a direction in forward mode: {err}") from err
        finally:
            self._busy = False
        return tree_map(lambda t: fwAD.unpack_dual(t).tangent if isinstance(t, torch.Tensor) else None, out)

    # ------------------------------------------------------------------ hooks
    def _hook(self, own):
        def hook(module, args, kwargs, output):
            if self._busy or not torch.is_grad_enabled():  # under no_grad the output carries no gradient
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
                if self._shared_by_rows(primal, n_rows):
                    # shared by every row (GPT-2's position embeddings [1, T, d], BART-family ones [T, d]): give
                    # each row its own copy, so that the backward hands back per-row output-gradients
                    if primal.shape[0] != 1:
                        primal, tangent = primal[None], None if tangent is None else tangent[None]
                        pieces = [(g, d, t[None]) for g, d, t in pieces]
                    primal = primal.expand(n_rows, *primal.shape[1:]).clone()
                    tangent = None if tangent is None else tangent.expand_as(primal).clone()
                    pieces = [(g, d, t.expand_as(primal)) for g, d, t in pieces]
                self._check_rows(module, primal.shape, n_rows)
                base = hookable(primal)
                base.register_hook(self._contract(pieces))
                if self.propagate:
                    total = sum(t for _, d, t in pieces if d in self.tangent_dirs)
                    if not isinstance(total, int):
                        tangent = (total if tangent is None else tangent + total).detach()
                    base = fwAD.make_dual(base, tangent)
                new_flat.append(base)
            return tree_unflatten(new_flat, spec)

        return hook

    def _note_tokens(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            self._flat_rows = ids.shape[0] * ids.shape[1]

    def _shared_by_rows(self, primal: torch.Tensor, n_rows: int) -> bool:
        if n_rows == 1 or primal.shape[0] == n_rows:
            return False
        tokens = self._flat_rows // n_rows
        return primal.shape[0] == 1 or (primal.dim() == 2 and primal.shape[0] == tokens and
                                        primal.shape[0] * n_rows != primal.shape[0])

    def _check_rows(self, module, shape, n_rows: int) -> None:
        """Each output's first dimension must be the batch's rows, or its tokens flattened row-major
        (``[row * position * ...]``: OPT's MLP, MoE routers and experts, gated norms over heads), so that every
        entry maps to one row. A flattening in another order (tokens sorted by expert) would attribute values to
        the wrong rows: the built-in check (random instance weights) refuses it."""
        if shape[0] == n_rows or (self._flat_rows and shape[0] % self._flat_rows == 0):
            return
        raise UnsupportedModuleError(
            f"module {self._module_names.get(id(module), '?')!r} ({type(module).__qualname__}) returned an output "
            f"of shape {tuple(shape)} for a batch of {n_rows} rows of {self._flat_rows // max(n_rows, 1)} tokens: "
            "the engine needs rows (or rows x tokens, flattened) as the first dimension of every output of a "
            "module with parameters, to attribute it to its instance")

    def _contract(self, pieces):
        acc = self._acc
        n_rows = acc.shape[0]

        def on_grad(delta: torch.Tensor):
            dd = delta.to(self.acc_dtype)
            for g, d, t in pieces:
                # rows first; a [row * token, ...] output reshapes row-major to [row, token * ...]
                acc[:, g, d] += (dd * t.to(self.acc_dtype)).reshape(n_rows, -1).sum(1).to(acc.device)
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
        if not self._adopted:
            self._adopt_parameters_used_by_ancestors(fn)
        self._acc = torch.zeros(n_rows, len(self.groups.names), len(self.directions), dtype=self.acc_dtype,
                                device=device)
        with ExitStack() as stack:
            stack.enter_context(engine_mode(self.model, keep_grad=param_grads))
            stack.enter_context(torch.enable_grad())
            if self.propagate:  # only the math SDPA backend and the eager experts have forward-mode derivatives
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
                stack.enter_context(forward_mode_experts(self.model))
            with fwAD.dual_level():
                handles = [m.register_forward_hook(self._hook(own), with_kwargs=True) for m, own in self._owners]
                handles.append(self.model.register_forward_pre_hook(self._note_tokens, with_kwargs=True))
                try:
                    losses, extras = fn()
                except NotImplementedError as err:  # an op or a custom autograd.Function without forward mode
                    if not self.propagate:
                        raise
                    module = _innermost_module(err)
                    raise UnsupportedModuleError(
                        f"per-token G-effects carry forward-mode derivatives through the whole model, and module "
                        f"{self._module_names.get(id(module), '?')!r} ({type(module).__qualname__}) has no "
                        f"forward-mode derivative ({err}). Pass per_token=False: the per-layer and PG-effects stay "
                        "exact") from err
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
                params = trainable_parameters(self.model)
                got = torch.autograd.grad(primal_loss.sum(), params, allow_unused=True)
                grads = {id(p): g for p, g in zip(params, got) if g is not None}
            elif primal_loss.requires_grad:
                primal_loss.sum().backward()
        acc, self._acc = self._acc, None
        return GhostResult(acc, (primal_loss.detach(), primals, tangents), grads)
