"""open-unlearning's methods as composites of our objectives: ``from_open_unlearning("NPO", {"beta": 0.1})``.

open-unlearning (github.com/locuslab/open-unlearning) names a method (its trainer ``handler``) and its
``method_args``; the loss of a batch is ``gamma · forget_loss + alpha · retain_loss``. Each method below maps to
a composite whose total ``Σ_t weight_t · mean_j ℓ_{t,j}`` equals that batch loss on the same batch, and so has
the same gradient. Absent method_args take the defaults of the method's trainer config.

=============  ===============================================  ==================================================
method         method_args (defaults)                           composite
=============  ===============================================  ==================================================
GradAscent     (none)                                           ``wga(alpha=0, pooled=True)``
GradDiff       gamma=1, alpha=1, retain_loss_type=NLL           ``gamma*wga(alpha=0, pooled=True) + alpha*R``
NPO            beta=0.1, gamma=1, alpha=1, NLL                  ``gamma*npo(beta) + alpha*R``
SimNPO         delta=0, beta=4.5, gamma=0.125, alpha=1, NLL     ``gamma*simnpo(beta, delta, delta_inside=True)
                                                                + alpha*R``
DPO            beta=0.1, gamma=1, alpha=1, NLL                  ``gamma*dpo(beta) + alpha*R``
RMU            steering_coeff=2, module_regex=model\\.layers\\.7, ``gamma*rmu(layer, c=steering_coeff,
               gamma=1, alpha=1, retain_loss_type=EMBED_DIFF    normalize=True) + alpha*R``
WGA            beta=1, gamma=1, alpha=1, NLL                    ``gamma*wga(alpha=beta, pooled=True) + alpha*R``
SatImp         beta1=5, beta2=1, gamma=0.1, alpha=1, NLL        ``gamma*satimp(beta1, beta2, pooled=True) + alpha*R``
CEU            ignore_first_n_answer_tokens=1                   ``ceu(skip_first=n, pooled=True)``
=============  ===============================================  ==================================================

``R`` is the retain term of ``retain_loss_type``: ``NLL`` → ``gd(pooled=True)``, ``KL`` → ``kl_all()``,
``EMBED_DIFF`` (RMU only) → ``rr(layer, dim_mean=True)``; with ``alpha=0`` it is left out.

Conventions that differ from ours, and the parameter that gives open-unlearning's:

* Token pooling: its token-level losses (GradAscent/GradDiff's NLL, WGA, SatImp, CEU, the NLL and KL retain
  losses) average token losses over all answer tokens of the batch, so long answers weigh more; ours average
  per sample, then over samples. ``pooled=True`` (on ``wga``, ``gd``, ``kl``, ``satimp``, ``ceu``) gives theirs:
  each sample's loss becomes its share ``n·Σ_k ℓ_k / Σ_batch tokens``, so it depends on the batch it is in.
  ``ga`` itself keeps no parameter; ``wga(alpha=0, pooled=True)`` is the pooled GA.
* KL retain loss: open-unlearning averages KL(p_o‖p) over every position of the padded batch (prompt, answer
  and padding positions alike); our ``kl`` over the answer tokens. ``kl_all`` takes theirs (the engine then
  hands the distributions at every position, ``all_logp``).
* RMU's retain loss (EMBED_DIFF) averages the squared distance over the hidden dimension; our ``rr`` sums it:
  ``rr(dim_mean=True)``. Its random direction is normalised to unit length before ``steering_coeff`` scales it:
  ``rmu(normalize=True)``; open-unlearning draws it from the global random state, ours from ``rmu.seed``, so the
  losses agree for the same direction only.
* SimNPO's ``delta`` is subtracted from the mean NLL inside ``beta``: ``logsigmoid(beta·(nll̄ − delta))``; our
  ``simnpo.delta`` is by default the margin outside it: ``simnpo(delta_inside=True)`` takes theirs.
* Defaults are those of the trainer configs (NPO and DPO ``beta=0.1``, RMU ``steering_coeff=2``), not of the
  trainer classes' signatures. ``trainable_params_regex`` selects parameters, not a loss: only "all" is accepted
  here; freeze parameters on the model instead (G-effects are taken over the trainable parameters).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .builtin import ceu, dpo, gd, kl_all, npo, rmu, rr, satimp, simnpo, wga
from .registry import Objective, ObjectiveError, Term, check_weight

__all__ = ["from_open_unlearning", "OPEN_UNLEARNING_METHODS"]

_RETAIN = {"gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"}
_ALL_PARAMS = (".*",)
# method -> its method_args and their defaults (open-unlearning's configs/trainer/<method>.yaml)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "GradAscent": {},
    "GradDiff": dict(_RETAIN),
    "NPO": {"beta": 0.1, **_RETAIN},
    "SimNPO": {"delta": 0.0, "beta": 4.5, "gamma": 0.125, "alpha": 1.0, "retain_loss_type": "NLL"},
    "DPO": {"beta": 0.1, **_RETAIN},
    "RMU": {"steering_coeff": 2.0, "module_regex": r"model\.layers\.7", "trainable_params_regex": _ALL_PARAMS,
            "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "EMBED_DIFF"},
    "WGA": {"beta": 1.0, **_RETAIN},
    "SatImp": {"beta1": 5.0, "beta2": 1.0, "gamma": 0.1, "alpha": 1.0, "retain_loss_type": "NLL"},
    "CEU": {"ignore_first_n_answer_tokens": 1},
}
OPEN_UNLEARNING_METHODS: tuple[str, ...] = tuple(_DEFAULTS)
_TEXT_ARGS = {"retain_loss_type", "module_regex", "trainable_params_regex"}


def from_open_unlearning(method: str, method_args: Mapping[str, Any] | None = None, *, model=None) -> Objective:
    """The composite equal to open-unlearning's ``method`` with ``method_args`` (its defaults where absent).

    ``model`` resolves RMU's ``module_regex`` against the model's module names (without it, a plain name such as
    ``model\\.layers\\.7`` gives the block index). Unknown methods or method_args raise :class:`ObjectiveError`
    listing the valid ones. See the module docstring for the table and the conventions that differ.
    """
    name = _method_name(method)
    args = _method_args(name, method_args)
    layer = _layer(args["module_regex"], model) if name == "RMU" else None
    try:
        forget = _forget_term(name, args, layer)
        if "retain_loss_type" not in args:
            return Objective((forget,))
        terms = [args["gamma"] * forget]
        if args["alpha"] != 0:
            terms.append(args["alpha"] * _retain_term(name, args["retain_loss_type"], layer))
        return Objective(tuple(terms))
    except ObjectiveError as err:
        raise ObjectiveError(f"open-unlearning {name}: {err}") from None


def _method_name(method: Any) -> str:
    by_lower = {m.lower(): m for m in OPEN_UNLEARNING_METHODS}
    if not isinstance(method, str) or method.lower() not in by_lower:
        raise ObjectiveError(f"open-unlearning method {method!r} has no mapping; mapped methods: "
                             f"{', '.join(OPEN_UNLEARNING_METHODS)}")
    return by_lower[method.lower()]


def _method_args(name: str, method_args: Mapping[str, Any] | None) -> dict[str, Any]:
    defaults = _DEFAULTS[name]
    if method_args is not None and not isinstance(method_args, Mapping):
        raise ObjectiveError(f"open-unlearning {name}: method_args must be a mapping, got {method_args!r}")
    args = dict(defaults)
    for key, value in (method_args or {}).items():
        if key not in defaults:
            valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
            raise ObjectiveError(f"open-unlearning {name} has no method_arg {key!r} here; its method_args are: "
                                 f"{valid}")
        args[key] = value if key in _TEXT_ARGS else _number(name, key, value)
    if "retain_loss_type" in args:
        kinds = ("NLL", "KL", "EMBED_DIFF") if name == "RMU" else ("NLL", "KL")
        kind = str(args["retain_loss_type"]).upper()
        if kind not in kinds:
            raise ObjectiveError(f"open-unlearning {name}: retain_loss_type={args['retain_loss_type']!r} is not "
                                 f"supported; use one of {', '.join(kinds)}")
        args["retain_loss_type"] = kind
    if "trainable_params_regex" in args:
        chosen = args["trainable_params_regex"]
        if tuple([chosen] if isinstance(chosen, str) else chosen or _ALL_PARAMS) != _ALL_PARAMS:
            raise ObjectiveError(f"open-unlearning {name}: trainable_params_regex={chosen!r} selects parameters, "
                                 "not a loss; G-effects are taken over the model's trainable parameters, so "
                                 "freeze the others (requires_grad=False) and leave it at '.*'")
    return args


def _number(name: str, key: str, value: Any) -> float:
    try:
        return check_weight(key, value)  # the same rule as a weight: a finite number, or one written as text
    except ObjectiveError:
        raise ObjectiveError(f"open-unlearning {name}: method_arg {key}={value!r} must be a finite number") from None


def _forget_term(name: str, args: dict[str, Any], layer: int | None) -> Term:
    if name in ("GradAscent", "GradDiff"):
        return wga(alpha=0.0, pooled=True)
    if name == "NPO":
        return npo(beta=args["beta"])
    if name == "SimNPO":
        return simnpo(beta=args["beta"], delta=args["delta"], delta_inside=True)
    if name == "DPO":
        return dpo(beta=args["beta"])
    if name == "RMU":
        return rmu(layer=layer, c=args["steering_coeff"], normalize=True)
    if name == "WGA":
        return wga(alpha=args["beta"], pooled=True)
    if name == "SatImp":
        return satimp(beta1=args["beta1"], beta2=args["beta2"], pooled=True)
    n = args["ignore_first_n_answer_tokens"]
    if not float(n).is_integer():
        raise ObjectiveError(f"ignore_first_n_answer_tokens={n!r} must be a whole number")
    return ceu(skip_first=int(n), pooled=True)


def _retain_term(name: str, kind: str, layer: int | None) -> Term:
    if kind == "NLL":
        return gd(pooled=True)
    if kind == "KL":
        return kl_all()
    return rr(layer=layer, dim_mean=True)  # EMBED_DIFF, RMU only


def _layer(regex: Any, model) -> int:
    """The decoder block RMU reads: the block index of the one module ``regex`` fully matches."""
    if not isinstance(regex, str):
        raise ObjectiveError(f"open-unlearning RMU: module_regex must be text, got {regex!r}")
    if model is None:
        plain = regex.replace("\\.", ".")
        found = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*\.(\d+)", plain)
        if not found:
            raise ObjectiveError(f"open-unlearning RMU: cannot read a block index from module_regex={regex!r}; "
                                 "write one like model\\.layers\\.7, or pass model= to match it against the model")
        return int(found[1])
    modules = dict(model.named_modules())
    names = [n for n in modules if re.fullmatch(regex, n)]
    if len(names) != 1:
        raise ObjectiveError(f"open-unlearning RMU: module_regex={regex!r} matches {len(names)} modules of the "
                             f"model ({', '.join(names[:5]) or 'none'}); it must match one decoder block")
    parent, _, index = names[0].rpartition(".")
    if not index.isdigit() or not isinstance(modules.get(parent), torch.nn.ModuleList):
        raise ObjectiveError(f"open-unlearning RMU: module_regex={regex!r} matches {names[0]!r}, which is not a "
                             "decoder block (an entry of the model's list of blocks, such as model.layers.7)")
    return int(index)
