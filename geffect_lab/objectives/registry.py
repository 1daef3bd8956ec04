"""The objective registry: small functions that return per-sample losses, and their composites.

An objective is a function ``f(x: ObjectiveInputs, **params) -> Tensor[sample]`` registered by name. The
engine owns every forward pass: it reads what the objective *needs* (reference log-probs, a refusal answer,
hidden states of a block, full next-token distributions) from its registration and hands it over in
:class:`ObjectiveInputs`. Parameters and their defaults are read from the function's signature, so the
CLI and the dashboard can offer them.

>>> @objective("mine", needs=("ref_logp",))
... def mine(x, beta: float = 0.5):
...     "GA damped by the reference's confidence."
...     return -x.mean(x.nll * torch.exp(beta * x.ref_logp))
>>> obj = get_objective("mine")(beta=0.2) + 0.5 * get_objective("gd")()   # a composite Objective
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

__all__ = ["ObjectiveInputs", "ObjectiveSpec", "Bound", "Term", "Objective", "objective", "get_objective",
           "remove_objective", "list_objectives", "resolve_objective", "NEEDS", "ObjectiveError"]

# What an objective may ask the engine for (besides ``logp``/``mask``, always given).
NEEDS = {
    "ref_logp": "log-probability of each answer token under the frozen reference model",
    "full_logp": "log-probabilities over the whole vocabulary at each answer position",
    "ref_full_logp": "the reference model's log-probabilities over the vocabulary at each answer position",
    "alt": "log-probabilities of a refusal answer to the same question (alt_logp, alt_mask)",
    "ref_alt_logp": "the reference model's log-probabilities of the refusal answer",
    "hidden": "hidden states after block `layer` at the answer tokens (hidden, hidden_mask)",
    "ref_hidden": "the reference model's hidden states after block `layer`",
    "all_logp": "log-probabilities over the vocabulary at every position of the padded batch (all_logp)",
    "ref_all_logp": "the reference model's log-probabilities over the vocabulary at every position",
}
ROLES = ("forget", "retain")


class ObjectiveError(ValueError):
    """An objective that is unknown, mis-parameterised or that returned an unusable loss."""


@dataclass
class ObjectiveInputs:
    """What the engine hands an objective for a batch of samples (dims in brackets).

    ``logp`` [sample, token]: log-probability of each answer token (0 outside the answer, differentiable);
    ``mask`` [sample, token]: 1.0 on answer tokens. Optional fields are filled when the objective declares
    them in ``needs`` (see :data:`NEEDS`); reference quantities carry no gradient.
    """

    logp: torch.Tensor
    mask: torch.Tensor
    ids: list[str] = field(default_factory=list)
    ref_logp: torch.Tensor | None = None
    full_logp: torch.Tensor | None = None         # [sample, token, vocab]
    ref_full_logp: torch.Tensor | None = None
    alt_logp: torch.Tensor | None = None          # [sample, token'] on the refusal answer
    alt_mask: torch.Tensor | None = None
    ref_alt_logp: torch.Tensor | None = None
    hidden: torch.Tensor | None = None            # [sample, token, d] after block `layer` at answer tokens
    hidden_mask: torch.Tensor | None = None       # [sample, token]
    ref_hidden: torch.Tensor | None = None
    all_logp: torch.Tensor | None = None          # [sample, position, vocab] every position of the padded batch
    ref_all_logp: torch.Tensor | None = None

    @property
    def nll(self) -> torch.Tensor:
        """``-logp`` [sample, token] (0 outside the answer)."""
        return -self.logp

    @property
    def n_samples(self) -> int:
        return self.logp.shape[0]

    def mean(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over each sample's answer tokens: [sample, token] → [sample]."""
        m = self.mask if mask is None else mask
        return (values * m).sum(-1) / m.sum(-1).clamp_min(1)

    def sum(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over each sample's answer tokens: [sample, token] → [sample]."""
        m = self.mask if mask is None else mask
        return (values * m).sum(-1)

    def pooled(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each sample's share of the token mean over the whole batch: ``n · Σ_k v_jk / Σ_{j,k} m_jk`` →
        [sample], so that the mean over samples is the batch's token mean (long answers weigh more)."""
        m = self.mask if mask is None else mask
        return (values * m).sum(-1) * (m.shape[0] / m.sum().clamp_min(1))

    def token_mean(self, values: torch.Tensor, mask: torch.Tensor | None = None, pooled: bool = False):
        """:meth:`mean` (per sample) or, when ``pooled``, :meth:`pooled` (over the batch's tokens)."""
        return self.pooled(values, mask) if pooled else self.mean(values, mask)


@dataclass(frozen=True)
class Bound:
    """The valid range of a numeric objective parameter: ``Bound.parse("> 0")``, ``">= 0"``, ``"<= 1"``,
    ``"[0, 1]"``, ``"(0, 1]"``; or the valid values of a text parameter: ``"{answer, predicting, all}"``. Every
    float parameter must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Bound:
        text = text.replace(" ", "")
        listed = re.fullmatch(r"\{([A-Za-z0-9_\-]+(?:,[A-Za-z0-9_\-]+)*)\}", text)
        if listed:
            return cls(choices=tuple(listed[1].split(",")))
        one = re.fullmatch(r"(>=|>|<=|<)([-+0-9.eE]+)", text)
        if one:
            op, value = one[1], float(one[2])
            return cls(low=value, low_open=op == ">") if op[0] == ">" else cls(high=value, high_open=op == "<")
        two = re.fullmatch(r"([\[(])([-+0-9.eE]+),([-+0-9.eE]+)([\])])", text)
        if not two:
            raise ObjectiveError(f"cannot read the bound {text!r}; write '> 0', '>= 0', '<= 1', '[0, 1]' or "
                                 "'{a, b}' (the valid values of a text parameter)")
        return cls(float(two[2]), float(two[3]), two[1] == "(", two[4] == ")")

    def contains(self, value) -> bool:
        if self.choices:
            return value in self.choices
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.choices:
            return f"in {{{', '.join(self.choices)}}}"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def check_weight(name: str, weight: Any) -> float:
    """A term's weight: a finite number (a number written as text, from the CLI, is read)."""
    if isinstance(weight, str):
        try:
            weight = float(weight)
        except ValueError:
            pass
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ObjectiveError(f"the weight of {name!r} is {weight!r}; give a finite number")
    return float(weight)


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: its per-sample loss function, role, needs and parameters."""

    name: str
    fn: Callable[..., torch.Tensor]
    role: str = "forget"
    needs: frozenset[str] = frozenset()
    description: str = ""
    weight: Callable[..., torch.Tensor] | None = None  # per-sample gradient weight, for diagnostics
    bounds: Mapping[str, Bound] = field(default_factory=dict)  # valid ranges of numeric parameters

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        """The objective's parameters (name → ``inspect.Parameter``), from its signature."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: (None if p.default is p.empty else p.default) for k, p in self.parameters.items()}

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and complete parameters: unknown names and wrong types are errors that list the valid
        parameters; ints are accepted for floats."""
        known = self.parameters
        out = dict(self.defaults)
        for key, value in params.items():
            if key not in known:
                valid = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
                raise ObjectiveError(f"objective {self.name!r} has no parameter {key!r}; its parameters are: "
                                     f"{valid}")
            out[key] = self._in_range(key, _coerce(self.name, key, value, known[key]))
        missing = [k for k, p in known.items() if p.default is p.empty and k not in params]
        if missing:
            raise ObjectiveError(f"objective {self.name!r} needs a value for {', '.join(missing)}")
        return out

    def _in_range(self, key: str, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ObjectiveError(f"objective {self.name!r}: parameter {key!r} is {value!r}; give a finite number")
        bound = self.bounds.get(key)
        if bound is not None and value is not None and not bound.contains(value):
            raise ObjectiveError(f"objective {self.name!r}: parameter {key}={value!r} is out of range; use "
                                 f"{key} {bound}")
        return value

    def __call__(self, *args, weight: float = 1.0, **params):
        """``spec(inputs, **params)`` computes the per-sample loss; ``spec(**params)`` makes a :class:`Term`."""
        if args and isinstance(args[0], ObjectiveInputs):
            return self.fn(*args, **params)
        if args:
            raise TypeError(f"{self.name}(...) takes keyword parameters only; pass them by name")
        return Term(self, self.check_params(params), check_weight(self.name, weight))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"<objective {self.name}({params}) role={self.role} needs={sorted(self.needs)}>"


def _coerce(name: str, key: str, value: Any, param: inspect.Parameter) -> Any:
    default = None if param.default is param.empty else param.default
    ann = param.annotation if param.annotation is not param.empty else None
    if isinstance(ann, str):  # from __future__ annotations: "float", "int | None", ...
        kinds = set(re.findall(r"[A-Za-z_]+", ann))
    elif ann is not None:
        kinds = {getattr(a, "__name__", str(a)) for a in getattr(ann, "__args__", (ann,))}
    else:
        kinds = {type(default).__name__} if default is not None else set()
    if value is None and ("None" in kinds or "NoneType" in kinds or default is None):
        return None
    if "bool" in kinds:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif "int" in kinds and "float" not in kinds:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif "float" in kinds:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif "str" in kinds:
        if isinstance(value, str):
            return value
    else:
        return value
    want = " or ".join(sorted(k for k in kinds if k not in ("None", "NoneType")))
    example = {"float": "0.5", "int": "2", "bool": "true"}.get(want, "")
    raise ObjectiveError(f"objective {name!r}: parameter {key!r} must be {want}, got {value!r}"
                         + (f"; give e.g. {key}={example}" if example else ""))


@dataclass(frozen=True)
class Term:
    """One objective with its parameters and weight; terms add up to an :class:`Objective`."""

    spec: ObjectiveSpec
    params: dict[str, Any]
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.spec.name

    def __add__(self, other):
        return Objective((self,)) + other

    def __radd__(self, other):
        if other == 0:  # sum([...])
            return Objective((self,))
        return NotImplemented

    def __mul__(self, factor: float) -> Term:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return replace(self, weight=check_weight(self.name, self.weight * float(factor)))

    __rmul__ = __mul__

    def sample_weight(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        """The objective's per-sample gradient weight (NPO's 2p^β/(p^β+p_o^β), …), if it defines one."""
        if self.spec.weight is None:
            return None
        with torch.no_grad():
            return self.spec.weight(inputs, **self.params).detach()

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        """Per-sample losses, checked: shape [sample], finite."""
        out = self.spec.fn(inputs, **self.params)
        if not isinstance(out, torch.Tensor) or out.shape != (inputs.n_samples,):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ObjectiveError(f"objective {self.name!r} must return one loss per sample, shape "
                                 f"({inputs.n_samples},); it returned {shape}")
        if not torch.isfinite(out).all():
            bad = [inputs.ids[i] if i < len(inputs.ids) else str(i)
                   for i in (~torch.isfinite(out)).nonzero().flatten().tolist()]
            raise ObjectiveError(f"objective {self.name!r} returned a non-finite loss (NaN or inf) for "
                                 f"{', '.join(bad[:5])}")
        return out

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        w = "" if self.weight == 1.0 else f"{self.weight:g}*"
        return f"{w}{self.name}({params})"


@dataclass(frozen=True)
class Objective:
    """An unlearning objective ``L_u = Σ_terms weight · mean_samples ℓ``: one forget term and any number of
    regularisers on retain samples. The ``term`` coordinate of results names them: ``"forget"`` for the
    forget term, the regulariser's name otherwise."""

    terms: tuple[Term, ...]

    def __post_init__(self):
        forget = [t for t in self.terms if t.spec.role == "forget"]
        if len(forget) != 1:
            names = ", ".join(t.name for t in forget) or "none"
            raise ObjectiveError(f"an objective has exactly one forget term (got {names}); add regularisers "
                                 f"such as {', '.join(n for n, s in _REGISTRY.items() if s.role == 'retain')}")
        names = self.term_names
        if len(set(names)) != len(names):
            raise ObjectiveError(f"a regulariser appears twice in {self}; combine their weights instead")

    def __add__(self, other):
        if isinstance(other, Term):
            return Objective(self.terms + (other,))
        if isinstance(other, Objective):
            return Objective(self.terms + other.terms)
        return NotImplemented

    def __mul__(self, factor: float) -> Objective:
        return Objective(tuple(t * factor for t in self.terms))

    __rmul__ = __mul__

    @property
    def forget_term(self) -> Term:
        return next(t for t in self.terms if t.spec.role == "forget")

    @property
    def term_names(self) -> list[str]:
        return ["forget" if t.spec.role == "forget" else t.name for t in self.terms]

    @property
    def name(self) -> str:
        """``npo`` or ``npo+gd`` (weights other than 1 written as ``0.5*gd``)."""
        return "+".join(("" if t.weight == 1.0 else f"{t.weight:g}*") + t.name for t in self.terms)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(t.spec.needs for t in self.terms))

    @property
    def reference_needs(self) -> frozenset[str]:
        """What the objective reads from a frozen reference model (``ref_*`` quantities); empty when none."""
        return frozenset(n for n in self.needs if n.startswith("ref_"))

    def params(self) -> dict[str, Any]:
        """Flat parameters: ``{"npo.beta": 0.1, "gd.weight": 1.0, ...}``."""
        out: dict[str, Any] = {}
        for t in self.terms:
            out[f"{t.name}.weight"] = t.weight
            out.update({f"{t.name}.{k}": v for k, v in t.params.items()})
        return out

    def __repr__(self) -> str:
        return " + ".join(repr(t) for t in self.terms)


# ----------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, ObjectiveSpec] = {}


def objective(name: str, *, role: str = "forget", needs: Iterable[str] = (),
              weight: Callable[..., torch.Tensor] | None = None, bounds: Mapping[str, str | Bound] | None = None,
              overwrite: bool = False):
    """Register a per-sample loss function under ``name``.

    The function takes an :class:`ObjectiveInputs` first and keyword parameters with defaults after it; it
    returns a tensor [sample]. ``role="forget"`` objectives run on forget samples, ``role="retain"`` ones
    (regularisers) on retain samples. ``needs`` lists what the engine must compute (see :data:`NEEDS`); an
    objective that needs ``hidden`` must have a ``layer`` parameter. ``weight(x, **params)`` optionally gives
    the per-sample factor by which the objective rescales a plain (ascent or descent) gradient — NPO's
    ``2p^β/(p^β+p_o^β)`` — which runs record as ``sample_weight``. A name already registered is refused
    unless ``overwrite=True`` (what a notebook cell that is edited and re-run wants). ``bounds`` declares the
    valid range of numeric parameters (``{"beta": "> 0"}``, see :class:`Bound`): values outside it are refused
    wherever the objective is used (API, CLI, dashboard); float parameters must be finite in any case.
    """
    if role not in ROLES:
        raise ObjectiveError(f"role must be one of {ROLES}, got {role!r}")
    needs = frozenset(needs)
    unknown = needs - set(NEEDS)
    if unknown:
        raise ObjectiveError(f"objective {name!r} needs unknown inputs {sorted(unknown)}; known: "
                             f"{', '.join(NEEDS)}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise ObjectiveError(f"objective names are identifiers (letters, digits, _ and -), got {name!r}")
    if name in _REGISTRY and not overwrite:
        what = "a built-in" if _REGISTRY[name].fn.__module__.endswith("objectives.builtin") else "already registered"
        raise ObjectiveError(f"objective {name!r} is {what}: pass overwrite=True to replace it, or choose another "
                             "name")

    parsed_bounds = {k: b if isinstance(b, Bound) else Bound.parse(b) for k, b in (bounds or {}).items()}

    def register(fn: Callable[..., torch.Tensor]) -> ObjectiveSpec:
        doc = inspect.getdoc(fn) or ""
        spec = ObjectiveSpec(name=name, fn=fn, role=role, needs=needs,
                             description=" ".join(doc.split("\n\n")[0].split()) if doc else "", weight=weight,
                             bounds=parsed_bounds)
        unknown_bounds = set(spec.bounds) - set(spec.parameters)
        if unknown_bounds:
            raise ObjectiveError(f"objective {name!r} bounds {sorted(unknown_bounds)}, which are not its parameters")
        if needs & {"hidden", "ref_hidden"} and "layer" not in spec.parameters:
            raise ObjectiveError(f"objective {name!r} needs hidden states, so it must take a 'layer' parameter")
        _REGISTRY[name] = spec
        return spec

    return register


def remove_objective(name: str) -> ObjectiveSpec:
    """Unregister ``name`` (a user objective, or a built-in you replaced) and return what was registered."""
    get_objective(name)
    return _REGISTRY.pop(name)


def list_objectives(role: str | None = None) -> list[str]:
    """Registered objective names (built-ins and user objectives), optionally of one role."""
    return [n for n, s in _REGISTRY.items() if role is None or s.role == role]


def get_objective(name: str) -> ObjectiveSpec:
    """The registered objective ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ObjectiveError(f"unknown objective {name!r}; registered objectives are: "
                             f"{', '.join(_REGISTRY)}") from None


_TERM = re.compile(r"^\s*(?:(?P<w>[0-9.eE+-]+)\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)\s*$")


def resolve_objective(objective: str | Term | Objective | ObjectiveSpec,
                      params: Mapping[str, Any] | None = None) -> Objective:
    """Turn ``"npo"``, ``"npo+0.5*gd"``, a :class:`Term` or an :class:`Objective` into an :class:`Objective`.

    ``params`` applies to a string objective: plain names (``{"beta": 0.1}``) go to the one term that has
    that parameter; ``"gd.weight"`` or ``"npo.beta"`` address a term by name.
    """
    params = dict(params or {})
    if isinstance(objective, ObjectiveSpec):
        objective = objective.name
    if isinstance(objective, Term):
        if params:
            raise ObjectiveError("give parameters inside the term, e.g. npo(beta=0.1), not as params=")
        return Objective((objective,))
    if isinstance(objective, Objective):
        if params:
            raise ObjectiveError("give parameters inside the terms, e.g. npo(beta=0.1) + gd(), not as params=")
        return objective
    if not isinstance(objective, str) or not objective.strip():
        raise ObjectiveError(f"objective must be a name like 'npo' or 'npo+gd', got {objective!r}")
    parsed: list[tuple[float, ObjectiveSpec]] = []
    for part in objective.split("+"):
        m = _TERM.match(part)
        if not m:
            raise ObjectiveError(f"cannot read {part.strip()!r} in objective {objective!r}; write terms like "
                                 "'npo+gd' or 'npo+0.5*kl'")
        try:
            weight = float(m["w"]) if m["w"] else 1.0
        except ValueError:
            raise ObjectiveError(f"bad weight {m['w']!r} in objective {objective!r}") from None
        if not math.isfinite(weight):
            raise ObjectiveError(f"the weight of {m['name']!r} must be finite")
        parsed.append((weight, get_objective(m["name"])))
    per_term: dict[str, dict[str, Any]] = {spec.name: {} for _, spec in parsed}
    weights = {spec.name: w for w, spec in parsed}
    for key, value in params.items():
        if "." in key:
            term, pname = key.split(".", 1)
            if term not in per_term:
                raise ObjectiveError(f"parameter {key!r} names no term of {objective!r} "
                                     f"(terms: {', '.join(per_term)})")
            if pname == "weight":
                weights[term] = value  # checked with the term
            else:
                per_term[term][pname] = value
            continue
        if key == "weight":  # a term's weight, not a parameter of its function
            if len(parsed) > 1:
                raise ObjectiveError(f"'weight' is ambiguous in {objective!r}; write "
                                     f"{' or '.join(f'{s.name}.weight' for _, s in parsed)}")
            weights[parsed[0][1].name] = value
            continue
        owners = [s.name for _, s in parsed if key in s.parameters]
        if not owners and len(parsed) == 1:
            per_term[parsed[0][1].name][key] = value  # check_params names the valid parameters
            continue
        if not owners:
            valid = ", ".join(f"{s.name}.{k}={v!r}" for _, s in parsed for k, v in s.defaults.items()) or "none"
            raise ObjectiveError(f"no term of {objective!r} has a parameter {key!r}; valid parameters: {valid} "
                                 "(and <term>.weight)")
        if len(owners) > 1:
            raise ObjectiveError(f"parameter {key!r} is ambiguous in {objective!r}; write "
                                 f"{' or '.join(f'{o}.{key}' for o in owners)}")
        per_term[owners[0]][key] = value
    return Objective(tuple(spec(weight=weights[spec.name], **per_term[spec.name]) for _, spec in parsed))
