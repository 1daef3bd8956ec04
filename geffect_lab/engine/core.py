"""The two engines behind :func:`geffect_lab.g_effect`: the fast ghost-dot-product engine (default) and the
per-instance autograd loop (the oracle). Both return the same :class:`Effects`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .._batching import chunks, eval_mode, trainable_parameters
from ..objectives import Objective, ObjectiveError
from .forward import Samples, answer_loglik, objective_inputs, risk_and_tokens
from .ghost import GhostPass, accumulation_dtype, engine_mode
from .groups import LayerGroups

__all__ = ["Effects", "ObjectiveGradient", "term_gradients", "risk_gradient", "target_risks", "fast_effects",
           "reference_effects", "check_totals", "EngineCheckError", "NoGradientWarning"]


@dataclass
class ObjectiveGradient:
    """The objective's gradient at θ, term by term, with the losses computed on the way."""

    grads: list[dict[int, torch.Tensor]]   # [term] -> {id(param): ∇(weight · mean_j ℓ_j)}
    term_loss: np.ndarray                  # [term]
    sample_loss: np.ndarray                # [sample] the forget term's ℓ_j
    sample_weight: np.ndarray | None       # [sample] the forget term's gradient weight, when it defines one

    def total(self) -> dict[int, torch.Tensor]:
        """∇L_u: the sum of the term gradients."""
        out: dict[int, torch.Tensor] = {}
        for direction in self.grads:
            for k, v in direction.items():
                out[k] = out[k] + v if k in out else v.clone()
        return out


@dataclass
class Effects:
    """Everything one engine call measures, as numpy arrays (float64)."""

    g_effect: np.ndarray            # [instance, layer, term]
    g_effect_token: np.ndarray      # [instance, token] (NaN past each answer's end)
    risk: np.ndarray                # [instance]
    token_count: np.ndarray         # [instance]
    pg_effect: np.ndarray | None    # [sample, against] the paper's PG-effect ⟨∇R(D), ∇log p(s_j)⟩
    term_loss: np.ndarray           # [term]  weight · mean_j ℓ_j
    sample_loss: np.ndarray         # [sample] the forget term's ℓ_j
    answer_tokens: list[list[int]] = field(default_factory=list)  # token ids of each target's answer
    extra: np.ndarray | None = None  # [instance, layer, extra direction] (e.g. the optimiser's step)
    sample_weight: np.ndarray | None = None
    sample_effect: np.ndarray | None = None  # [sample, against] weight · ⟨∇R(D), ∇ℓ_j⟩ / n (sums to the forget term's)


def term_gradients(model, objective: Objective, sides: dict[str, Samples], reference) -> ObjectiveGradient:
    """∇(weight · mean_j ℓ_j) of every term, the term losses and the forget term's per-sample losses (and
    weights). One ordinary forward+backward per term, in eval mode, ``.grad`` untouched."""
    params = trainable_parameters(model)
    if not params:
        raise ObjectiveError("no parameter of the model requires grad; the G-effect is taken over the "
                             "trainable parameters: make the ones to unlearn trainable (p.requires_grad_(True); "
                             "for a PEFT model, its adapter)")
    grads, losses, sample_loss, sample_weight = [], [], None, None
    with eval_mode(model), torch.enable_grad():
        for term in objective.terms:
            inputs = objective_inputs(model, term, sides[term.spec.role], reference)
            per_sample = term.loss(inputs)
            loss = term.weight * per_sample.mean()
            if term.spec.role == "forget":
                sample_loss = per_sample.detach().double().cpu().numpy()
                weight = term.sample_weight(inputs)
                sample_weight = None if weight is None else weight.double().cpu().numpy()
            got = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append({id(p): g.detach() for p, g in zip(params, got) if g is not None})
            losses.append(float(loss.detach()))
    _warn_unreached(model, params, grads)
    return ObjectiveGradient(grads, np.array(losses), sample_loss, sample_weight)


class NoGradientWarning(UserWarning):
    """Trainable parameters (adapters) that the objective's gradient never reaches."""


def _warn_unreached(model, params, grads) -> None:
    """Adapters (a model with frozen parameters) that no term's gradient reaches have a G-effect of 0 by
    construction; say so by name (a hidden-state objective at an early layer, or adapters the forward skips)."""
    if all(p.requires_grad for p in model.parameters()):
        return
    from .groups import layer_groups

    reached = set().union(*(g.keys() for g in grads))
    missed = [p for p in params if id(p) not in reached]
    if missed:
        groups = layer_groups(model)
        where = sorted({groups.of_param[id(p)] for p in missed if id(p) in groups.of_param})
        warnings.warn(f"{len(missed)} trainable parameter(s) in {', '.join(groups.names[g] for g in where)} get no "
                      "gradient from the objective, so their G-effect is 0 (first: "
                      f"{groups.param_names[id(missed[0])]})."
                      " Check that the adapters sit on the path of the objective's loss (e.g. not after an RMU layer)",
                      NoGradientWarning, stacklevel=3)


def risk_gradient(model, batch, chunk_size: int | None) -> dict[int, torch.Tensor]:
    """∇ of the mean risk over all rows of ``batch`` (one full-size gradient, accumulated over chunks)."""
    params = trainable_parameters(model)
    n = batch["input_ids"].shape[0]
    total = [torch.zeros_like(p) for p in params]
    with eval_mode(model), torch.enable_grad():
        for _, part in chunks(batch, chunk_size):
            risk, _, _ = risk_and_tokens(model, part)
            got = torch.autograd.grad(risk.sum(), params, allow_unused=True)
            for acc, g in zip(total, got):
                if g is not None:
                    acc.add_(g / n)
    return {id(p): g for p, g in zip(params, total)}


def target_risks(model, batch, chunk_size: int | None) -> np.ndarray:
    """Every row's risk, without gradients (chunked)."""
    out = []
    with torch.no_grad(), eval_mode(model):
        for _, part in chunks(batch, chunk_size):
            risk, _, _ = risk_and_tokens(model, part)
            out.append(risk.double().cpu().numpy())
    return np.concatenate(out)


def _answer_tokens(batch) -> list[list[int]]:
    labels = batch["labels"][:, 1:]
    return [row[row != -100].tolist() for row in labels]


def _check_finite(name: str, values: torch.Tensor, ids: Sequence[str]):
    bad = ~torch.isfinite(values)
    if bad.any():
        rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise FloatingPointError(f"non-finite {name} for instance(s) {', '.join(ids[i] for i in rows[:5])}: "
                                 "the model's outputs overflow; try float32/float64 instead of float16")


def fast_effects(model, groups: LayerGroups, objective: Objective, sides: dict[str, Samples], reference,
                 targets: dict[str, torch.Tensor], target_ids: list[str], target_sets: dict[str, slice],
                 chunk_size: int | None = 16, per_token: bool = True, pg: bool = True,
                 gradient: ObjectiveGradient | None = None, extra: Sequence[dict[int, torch.Tensor]] = (),
                 verify: bool = True) -> Effects:
    """The fast engine: ghost dot products over chunks of targets, forward-mode tangents for the tokens.

    ``gradient`` reuses an objective gradient already computed (a training loop has it for its update);
    ``extra`` directions (the optimiser's step) are contracted in the same pass into ``Effects.extra``;
    ``verify`` holds the per-layer totals of a few targets (:func:`check_rows`) to one plain backward over them
    (:func:`check_totals`), and the decompositions to each other, before returning.
    """
    gradient = gradient if gradient is not None else term_gradients(model, objective, sides, reference)
    grads = gradient.grads
    n = targets["input_ids"].shape[0]
    n_terms = len(grads)
    g_eff = np.zeros((n, len(groups.names), n_terms + len(extra)))
    risks = np.zeros(n)
    tok_eff = _empty_tokens(n, targets)
    lengths = targets["attention_mask"].sum(1)
    ghost = GhostPass(model, groups, list(grads) + list(extra), propagate=range(n_terms) if per_token else False)
    # With the PG-effect asked for, the same backward also yields each target set's risk gradient (chunks
    # never straddle two sets), so the PG-effect costs one more pass over the forget samples only.
    set_grads: list[dict[int, torch.Tensor]] = []
    # without the PG-effect, chunks may straddle the sets (fewer, fuller passes)
    for set_slice in target_sets.values() if pg else [slice(0, n)]:
        acc: dict[int, torch.Tensor] = {}
        size = set_slice.stop - set_slice.start
        # rows sorted by length, so that each chunk is padded only to its own longest row
        order = set_slice.start + torch.argsort(lengths[set_slice], stable=True)
        part_set = {k: v[order] for k, v in targets.items()}
        for rows, part in chunks(part_set, chunk_size):
            idx = order[rows].numpy()

            def fn(part=part):
                risk, nll, mask = risk_and_tokens(model, part)
                return risk, (nll, mask)

            res = ghost.run(fn, len(idx), param_grads=pg)
            risk, (_, mask), tangents = res.outputs
            _check_finite("risk", risk, [target_ids[i] for i in idx])
            g_eff[idx] = res.contrib.double().cpu().numpy()
            risks[idx] = risk.double().cpu().numpy()
            if per_token:
                tok = tangents[0].double().cpu().numpy()
                tok[(mask == 0).cpu().numpy()] = np.nan
                width = min(tok.shape[1], tok_eff.shape[1])
                tok_eff[idx, :width] = tok[:, :width]
            if pg:
                for k, g in res.param_grads.items():
                    if k in acc:
                        acc[k].add_(g, alpha=1.0 / size)
                    else:
                        acc[k] = g.div_(size)
            del res  # its parameter gradients, before the next pass allocates its own
        set_grads.append(acc)
    pg_eff = sample_eff = None
    if pg:
        sample_eff, pg_eff = _fast_per_sample(model, groups, objective, sides, reference, set_grads)
    if verify:
        rows = check_rows(lengths, dtype=next(model.parameters()).dtype)
        picked = torch.as_tensor(rows)
        check_totals(model, groups, grads, {k: v[picked] for k, v in targets.items()}, g_eff[rows, :, :n_terms],
                     chunk_size, objective.term_names)
        check_decompositions(model, g_eff[..., :n_terms], tok_eff if per_token else None, sample_eff, target_sets,
                             [t.spec.role for t in objective.terms].index("forget"))
    return Effects(g_eff[..., :n_terms], tok_eff, risks, _token_count(targets), pg_eff, gradient.term_loss,
                   gradient.sample_loss, _answer_tokens(targets), extra=g_eff[..., n_terms:] if extra else None,
                   sample_weight=gradient.sample_weight, sample_effect=sample_eff)


def check_tolerance(dtype: torch.dtype) -> float:
    """How far the fast engine's per-layer totals may sit from a plain backward's, relative to the largest
    layer x term total: HF computes norms and softmaxes in float32 even in a float64 model (~1e-8 there); in
    half precision both paths carry the rounding of 8-bit (bfloat16) or 11-bit (float16) mantissas."""
    return {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 5e-2)


class EngineCheckError(RuntimeError):
    """The fast engine disagrees with a plain backward: its numbers for this model would be wrong."""


# Targets in the built-in check's plain backward: enough to see a wrong formula, whose error shows on every row
# it touches, at a small part of the cost of a backward over all the targets (tests/engine/test_bad_models.py
# breaks the engine in each way it has been wrong and sees the check refuse it on these rows)
CHECK_ROWS = 4


def check_rows(lengths: torch.Tensor, k: int = CHECK_ROWS, seed: int = 0, dtype=torch.float32) -> np.ndarray:
    """The targets the built-in check runs over: the shortest (the most padding in a batch) and the longest row,
    so that a defect that depends on padding or on position shows, and ``k − 2`` others drawn with a fixed seed;
    every row when there are at most ``k``, and in half precision, where the tolerance is relative to the largest
    total and a few rows of a well-trained model can sit at the rounding floor (the totals of all rows see past
    it: a bfloat16 zoo model's embedding was refused on 4 rows, 6 % apart, and passes on all)."""
    n = len(lengths)
    if n <= k or dtype in (torch.float16, torch.bfloat16):
        return np.arange(n)
    order = torch.argsort(lengths, stable=True).numpy()
    ends = [int(order[0]), int(order[-1])]
    others = np.setdiff1d(np.arange(n), ends)
    drawn = np.random.default_rng(seed).choice(others, k - 2, replace=False)
    return np.sort(np.concatenate([ends, drawn]))


def check_totals(model, groups: LayerGroups, directions: Sequence[dict[int, torch.Tensor]],
                 targets: dict[str, torch.Tensor], g_eff: np.ndarray, chunk_size: int | None,
                 term_names: Sequence[str], seed: int = 0) -> None:
    """The built-in check: ``Σ_i w_i e_{i,l,t}`` from the fast engine against ``⟨∇ Σ_i w_i R_i, G_t⟩`` per layer
    group from one plain batched backward, with random instance weights ``w_i ∈ [0.5, 1.5)`` so that a value
    attributed to the wrong instance shows too. Raises :class:`EngineCheckError` naming the layer, the term and
    the module types in that layer. Costs one backward over the ``targets`` given (:func:`check_rows` picks
    them)."""
    n = targets["input_ids"].shape[0]
    weights = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    params = trainable_parameters(model)
    dtype = accumulation_dtype(model)
    total = [torch.zeros_like(p, dtype=dtype) for p in params]
    with eval_mode(model), torch.enable_grad():
        for rows, part in chunks(targets, chunk_size):
            risk, _, _ = risk_and_tokens(model, part)
            w = weights[rows].to(device=risk.device, dtype=risk.dtype)
            got = torch.autograd.grad((risk * w).sum(), params, allow_unused=True)
            for acc, g in zip(total, got):
                if g is not None:
                    acc += g.to(dtype)
    expected = np.stack([_dot_by_group(groups, total, params, d, dtype).double().numpy() for d in directions], 1)
    fast = np.einsum("i,ilt->lt", weights.numpy(), g_eff)
    tol = check_tolerance(next(model.parameters()).dtype)
    # relative to the largest layer x term value: in half precision a nearly-zero term is rounding noise
    scale = max(np.abs(expected).max(), np.abs(fast).max())
    for t, term in enumerate(term_names):
        bad = np.flatnonzero(np.abs(fast[:, t] - expected[:, t]) > tol * scale)
        if bad.size:
            layer = groups.names[bad[0]]
            raise EngineCheckError(
                f"the fast engine's G-effect of term {term!r} on layer {layer!r} is {fast[bad[0], t]:.6g} where a "
                f"plain backward gives {expected[bad[0], t]:.6g} (beyond the {tol:g} relative tolerance of this "
                f"dtype); module types in that layer: {', '.join(_module_types(model, groups, bad[0]))}. These "
                "numbers would be wrong: use engine='reference' and report the model type")


def check_decompositions(model, g_eff: np.ndarray, tok_eff: np.ndarray | None, sample_eff: np.ndarray | None,
                         target_sets: dict[str, slice], forget: int) -> None:
    """The fast engine's three decompositions come from independent computations (ghost contractions per
    layer, forward-mode tangents per token, per-sample contractions over the forget samples); they must agree
    where the math says they add up: ``mean_k e_{i,k} = Σ_{l,t} e_{i,l,t}`` for every instance, and
    ``Σ_j sample_effect_{j,D}`` = ``mean_{i∈D} Σ_l e_{i,l,forget}`` for every target set D. (The paper's
    PG-effect has no such identity for every objective; tests hold it to the oracle.)"""
    tol = check_tolerance(next(model.parameters()).dtype)
    e_i = g_eff.sum((1, 2))
    scale = max(np.abs(e_i).max(), 1e-300)
    if tok_eff is not None:
        got = np.nanmean(tok_eff, 1)
        worst = int(np.nanargmax(np.abs(got - e_i)))
        if abs(got[worst] - e_i[worst]) > tol * scale:
            raise EngineCheckError(
                f"per-token G-effects of target row {worst} average to {got[worst]:.6g}, its layers sum to "
                f"{e_i[worst]:.6g}: the forward-mode tangents through {type(model).__qualname__} are wrong (an op "
                "whose forward-mode derivative does not match its backward). Pass per_token=False, or use "
                "engine='reference'")
    if sample_eff is not None:
        for d, (name, rows) in enumerate(target_sets.items()):
            want = g_eff[rows, :, forget].sum(1).mean()
            got = sample_eff[:, d].sum()
            if abs(got - want) > tol * max(abs(want), np.abs(g_eff[rows, :, forget].sum(1)).max(), 1e-300):
                raise EngineCheckError(
                    f"the sample effects against {name!r} sum to {got:.6g} where the forget term's G-effect on that "
                    f"set is {want:.6g}: the per-sample pass over the forget samples is wrong for this model. Pass "
                    "pg=False, or use engine='reference'")


def _module_types(model, groups: LayerGroups, group: int) -> list[str]:
    out = []
    for module in model.modules():
        if any(id(p) in groups.of_param and groups.of_param[id(p)] == group
               for p in module._parameters.values() if p is not None):
            name = type(module).__qualname__
            if name not in out:
                out.append(name)
    return out


def _fast_per_sample(model, groups, objective, sides, reference, set_grads):
    """Two ghost passes over the forget samples against each target set's risk gradient: the forget term's
    per-sample losses (``sample_effect``, weighted and divided by the number of samples) and each sample's own
    answer log-likelihood (the paper's PG-effect)."""
    term = objective.forget_term
    side = sides["forget"]
    n = len(side.ids)
    ghost = GhostPass(model, groups, set_grads, propagate=False)

    def share():
        return term.loss(objective_inputs(model, term, side, reference)), ()

    def loglik():
        return answer_loglik(model, side.batch), ()

    sample = ghost.run(share, n).contrib.sum(1).double().cpu().numpy() * (term.weight / n)
    paper = ghost.run(loglik, n).contrib.sum(1).double().cpu().numpy()
    return sample, paper


def _token_count(targets) -> np.ndarray:
    return (targets["labels"][:, 1:] != -100).sum(1).numpy()


def _empty_tokens(n, targets):
    return np.full((n, max(int(_token_count(targets).max()), 1)), np.nan)


# ---------------------------------------------------------------------------------------------- oracle
def _dot_by_group(groups: LayerGroups, grads: Sequence[torch.Tensor | None], params, direction, dtype):
    out = torch.zeros(len(groups.names), dtype=dtype)
    for p, g in zip(params, grads):
        d = direction.get(id(p))
        if g is None or d is None:
            continue
        out[groups.of_param[id(p)]] += (g.to(dtype) * d.to(dtype)).sum().cpu()
    return out


def reference_effects(model, groups: LayerGroups, objective: Objective, sides: dict[str, Samples], reference,
                      targets: dict[str, torch.Tensor], target_ids: list[str], target_sets: dict[str, slice],
                      chunk_size: int | None = 16, per_token: bool = True, pg: bool = True) -> Effects:
    """The oracle: per instance (and per token, per sample) an ordinary full-size gradient, dotted with the
    term gradients layer by layer. Slow by design. Rows are chunked in their given order (the fast engine sorts
    them by length first); padding never changes a row's values."""
    gradient = term_gradients(model, objective, sides, reference)
    grads, total = gradient.grads, gradient.total()
    dtype = accumulation_dtype(model)
    params = trainable_parameters(model)
    n = targets["input_ids"].shape[0]
    width = max(int(_token_count(targets).max()), 1)
    g_eff = np.zeros((n, len(groups.names), len(grads)))
    tok_eff = np.full((n, width), np.nan)
    risks = np.zeros(n)
    with eval_mode(model), torch.enable_grad():
        for rows, part in chunks(targets, chunk_size):
            risk, nll, mask = risk_and_tokens(model, part)
            for r in range(rows.stop - rows.start):
                i = rows.start + r
                g_i = torch.autograd.grad(risk[r], params, retain_graph=True, allow_unused=True)
                for t, direction in enumerate(grads):
                    g_eff[i, :, t] = _dot_by_group(groups, g_i, params, direction, dtype).double().numpy()
                if per_token:
                    for k in range(int(mask[r].sum())):
                        g_k = torch.autograd.grad(nll[r, k], params, retain_graph=True, allow_unused=True)
                        tok_eff[i, k] = float(_dot_by_group(groups, g_k, params, total, dtype).sum())
            risks[rows] = risk.detach().double().cpu().numpy()
        pg_eff = sample_eff = None
        if pg:
            directions = [risk_gradient(model, {k: v[sl] for k, v in targets.items()}, chunk_size)
                          for sl in target_sets.values()]
            term = objective.forget_term
            per_sample = term.loss(objective_inputs(model, term, sides["forget"], reference))
            loglik = answer_loglik(model, sides["forget"].batch)
            n_samples = per_sample.shape[0]
            sample_eff = np.zeros((n_samples, len(directions)))
            pg_eff = np.zeros((n_samples, len(directions)))
            for j in range(n_samples):
                for out, value, scale in ((sample_eff, per_sample[j], term.weight / n_samples),
                                          (pg_eff, loglik[j], 1.0)):
                    g_j = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                    for d, direction in enumerate(directions):
                        out[j, d] = scale * float(_dot_by_group(groups, g_j, params, direction, dtype).sum())
    return Effects(g_eff, tok_eff, risks, _token_count(targets), pg_eff, gradient.term_loss, gradient.sample_loss,
                   _answer_tokens(targets), sample_weight=gradient.sample_weight, sample_effect=sample_eff)


__all__ += ["engine_mode"]
