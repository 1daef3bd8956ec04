"""The result schema, executable: every dim, coordinate and variable a geffect-lab Dataset may hold, and
:func:`validate`, which every producer (engine, runs, recorder, metrics, attribution, combine, load) calls on
what it returns.

A *run* Dataset has a ``step`` dim (DESIGN.md §4); an *evaluation* Dataset (TOFU metrics at one θ) is the
same variables without it; :func:`geffect_lab.combine` adds one more dim in front (``objective``, ``run``,
``seed`` …). This module imports nothing from the package: everything else reads the schema from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

__all__ = ["SCHEMA_VERSION", "SIGN_CONVENTION", "DIMS", "COORDS", "Variable", "VARIABLES", "INSTANCE_METRICS",
           "EVALUATION_METRICS", "SCALAR_METRICS", "METRICS", "ATTRIBUTIONS", "COARSE_GROUPS", "coarse_map",
           "SchemaError", "SchemaUpgradeWarning", "validate", "annotate", "variable_dims", "upgrade",
           "UPGRADABLE_VERSIONS"]

# 2: ``pg_effect`` is the paper's PG-effect; version 1's ``pg_effect`` (each sample's share of the forget term's
#    gradient) is ``sample_effect``; ``extraction_strength_similar`` is the paper's LCS rule, version 1's (ROUGE-L)
#    is ``extraction_strength_similar_rouge``. :func:`upgrade` reads version-1 files under the new names.
SCHEMA_VERSION = 2
UPGRADABLE_VERSIONS = (1,)
SIGN_CONVENTION = "dR ≈ -lr * g_effect; g_effect < 0 raises the risk"

# dim -> what one position along it is
DIMS: dict[str, str] = {
    "step": "an optimiser step of the run (the measurement is taken at θ_t, before the step's update)",
    "instance": "a measured instance (question + answer) of a target set",
    "layer": "a layer group: embed, layers.0 … layers.{L-1}, norm, lm_head",
    "token": "an answer token of an instance (position within the answer)",
    "term": "a term of the objective (forget, gd, kl, …)",
    "sample": "a forget sample the objective trains on",
    "against": "the target set whose mean risk gradient a PG-effect is taken against",
    "prompt_token": "a prompt token of an instance (position within the prompt), for attributions",
    "method": "an attribution method",
}

# coordinate -> its dims
COORDS: dict[str, tuple[str, ...]] = {
    "step": ("step",), "instance": ("instance",), "split": ("instance",), "question": ("instance",),
    "answer": ("instance",), "layer": ("layer",), "layer_index": ("layer",), "term": ("term",),
    "token": ("token",), "token_text": ("instance", "token"), "sample": ("sample",), "against": ("against",),
    "prompt_token": ("prompt_token",), "prompt_token_text": ("instance", "prompt_token"), "method": ("method",),
    "convergence_delta": ("instance",),
}


@dataclass(frozen=True)
class Variable:
    """A data variable: its dims in a run Dataset (``step`` first), names for people, units, and its kind."""

    dims: tuple[str, ...]
    long_name: str
    description: str
    units: str = ""              # "" for a pure number (plots then add no unit to the label)
    kind: str = "float"          # "float", "int" or "text"


VARIABLES: dict[str, Variable] = {
    "g_effect": Variable(("step", "instance", "layer", "term"), "G-effect",
                         "e_{i,l} = <grad_{theta_l} R_i, grad_{theta_l} L_u(term)>: the inner product of instance "
                         "i's risk gradient with the objective term's gradient, restricted to the parameters of "
                         "layer group l. Sums over layer and term to the instance's G-effect."),
    "g_effect_token": Variable(("step", "instance", "token"), "token G-effect",
                               "e_{i,k} = <grad r_{i,k}, grad L_u>: the G-effect of answer token k's NLL (all layers, "
                               "all terms); its mean over tokens is the instance's G-effect."),
    "pg_effect": Variable(("step", "sample", "against"), "PG-effect",
                          "pg_j = <grad R(D), grad log p(s_j)>: the paper's PG-effect (Eq. 5), forget sample j's own "
                          "answer log-likelihood gradient (log p(a|q) = sum over its answer tokens of log p_k; "
                          "unweighted, the same for every objective) against the mean risk gradient of the target "
                          "set named by 'against'. Divide by sample_token_count for the per-token-mean reading."),
    "sample_effect": Variable(("step", "sample", "against"), "sample effect",
                              "weight * <grad R(D), grad l_j> / n: forget sample j's share of the forget term's "
                              "G-effect on the target set named by 'against' (it carries the objective's own "
                              "weights, e.g. NPO's w_j; n the number of forget samples of the step). Sums over "
                              "sample to the forget term's G-effect on that set."),
    "sample_token_count": Variable(("sample",), "forget-sample answer tokens",
                                   "number of answer tokens of each forget sample (the length behind the sum in "
                                   "pg_effect's log p(s_j)).", "tokens", "int"),
    "update_effect": Variable(("step", "instance", "layer"), "update effect",
                              "<grad_{theta_l} R_i, -delta theta_t / lr>: the inner product with the optimiser's "
                              "actual step; equals the G-effect under plain SGD."),
    "interval_effect": Variable(("step", "instance", "layer"), "interval update effect",
                                "<grad_{theta_l} R_i(theta_a), theta_a - theta_b>: at checkpoint a, the inner product "
                                "with the change of the parameters up to the next checkpoint b; by first order the "
                                "risk change over the interval is minus its sum over layers (replay)."),
    "interval_risk_change": Variable(("step", "instance"), "interval risk change",
                                     "R_i(theta_b) - R_i(theta_a): the measured risk change from this checkpoint to "
                                     "the next (replay).", "nat"),
    "risk": Variable(("step", "instance"), "risk", "R_i: mean negative log-likelihood of instance i's answer "
                                                   "tokens.", "nat"),
    "objective_loss": Variable(("step",), "objective loss", "L_u: the unlearning objective's value (sum of its "
                                                            "weighted terms).", "nat"),
    "term_loss": Variable(("step", "term"), "term loss", "weight * mean over samples of the term's per-sample "
                                                         "loss.", "nat"),
    "sample_loss": Variable(("step", "sample"), "sample loss", "l_j: the forget term's loss on forget sample j "
                                                               "(unweighted).", "nat"),
    "token_count": Variable(("instance",), "answer tokens", "number of answer tokens of the instance (the risk's "
                                                            "denominator).", "tokens", "int"),
    "sample_weight": Variable(("step", "sample"), "objective weight",
                              "the forget term's per-sample gradient weight relative to plain ascent (NPO: 2 p^beta / "
                              "(p^beta + p_o^beta); 1 means GA-like)."),
    "learning_rate": Variable(("step",), "learning rate", "the rate of the update from this step to the next "
                                                          "(theta_t -> theta_t+1), as the optimiser used it; NaN "
                                                          "where no update follows or the rate is unknown."),
    # TOFU metrics (geffect_lab.metrics)
    "probability": Variable(("step", "instance"), "probability",
                            "exp(-mean token NLL) of the answer (TOFU's normalised probability); on sets without "
                            "paraphrases, normalised over the answer and its perturbed answers."),
    "truth_ratio": Variable(("step", "instance"), "truth ratio",
                            "R = P_perturbed / P_paraphrased = exp(NLL(paraphrase) - mean NLL(perturbed))."),
    "truth_ratio_score": Variable(("step", "instance"), "truth-ratio score",
                                  "min(R, 1/R) on the forget set, max(0, 1 - R) elsewhere."),
    "rouge_l": Variable(("step", "instance"), "ROUGE-L recall", "ROUGE-L recall of the greedy answer against the "
                                                                "reference answer."),
    "exact_memorization": Variable(("step", "instance"), "exact memorisation",
                                   "share of answer tokens predicted by the argmax (teacher forcing)."),
    "extraction_strength": Variable(("step", "instance"), "extraction strength",
                                    "1 - k*/|a|, k* the shortest answer prefix from which greedy decoding reproduces "
                                    "the rest exactly."),
    "extraction_strength_similar": Variable(("step", "instance"), "extraction strength (similar)",
                                            "as extraction_strength, the rest counted as reproduced when the token "
                                            "LCS of the generated continuation (cut to the rest's length) and the "
                                            "rest is at least half the continuation's length (the paper's rule)."),
    "extraction_strength_paraphrased": Variable(("step", "instance"), "extraction strength (paraphrased question)",
                                                "as extraction_strength (exact), the paraphrased question as the "
                                                "prompt: the paper's perturbed-question variant."),
    "extraction_strength_similar_rouge": Variable(("step", "instance"), "extraction strength (similar, ROUGE-L)",
                                                  "as extraction_strength, the rest counted as reproduced at ROUGE-L "
                                                  "recall >= threshold (0.9 by default)."),
    "generated_text": Variable(("step", "instance"), "generated answer", "the greedy answer to the question.",
                               kind="text"),
    "generation_truncated": Variable(("step", "instance"), "generation truncated",
                                     "1 where greedy generation hit the length bound."),
    "forget_quality": Variable(("step",), "forget quality",
                               "KS-test p-value between the forget-set truth ratios of the model and of the retain "
                               "model (1: indistinguishable)."),
    "log10_forget_quality": Variable(("step",), "log10 forget quality", "log10 of the forget quality."),
    "model_utility": Variable(("step",), "model utility",
                              "harmonic mean of probability, ROUGE-L and truth-ratio score on the retain and "
                              "general-knowledge sets."),
    # Captum attributions (geffect_lab.attribution)
    "token_attribution": Variable(("step", "instance", "prompt_token", "method"), "token attribution",
                                  "Captum attribution of the answer log-probability to each prompt token (baseline: "
                                  "the pad token), per method.", "nat"),
    "layer_attribution": Variable(("step", "instance", "layer"), "layer attribution",
                                  "Captum gradient x activation of the answer log-probability at each layer's output, "
                                  "summed over positions and hidden units.", "nat"),
    "attribution_delta": Variable(("step", "instance"), "IG convergence delta",
                                  "integrated gradients' completeness gap: sum of attributions minus (F(x) - "
                                  "F(baseline)).", "nat"),
}

# per instance: recorded along a run, and the two an evaluation adds when asked
INSTANCE_METRICS = ("probability", "truth_ratio", "truth_ratio_score", "rouge_l", "exact_memorization",
                    "extraction_strength", "generated_text")
EVALUATION_METRICS = INSTANCE_METRICS + ("extraction_strength_similar", "extraction_strength_paraphrased",
                                         "generation_truncated")
SCALAR_METRICS = ("forget_quality", "log10_forget_quality", "model_utility")
METRICS = EVALUATION_METRICS + SCALAR_METRICS
ATTRIBUTIONS = ("token_attribution", "layer_attribution", "attribution_delta")

# the paper's five coarse layer groups (thirds of the blocks between embed and lm)
COARSE_GROUPS = ("embed", "shallow", "middle", "deep", "lm")


def coarse_map(layer_names, n_blocks: int | None = None) -> dict[str, str]:
    """The paper's five groups: embed, shallow / middle / deep (thirds of the blocks), lm (norm + lm_head)."""
    blocks = [n for n in layer_names if str(n).startswith("layers.")]
    n = n_blocks if n_blocks is not None else len(blocks)
    out = {}
    for name in layer_names:
        name = str(name)
        if name == "embed":
            out[name] = "embed"
        elif name.startswith("layers."):
            i = int(name.split(".")[1])
            out[name] = COARSE_GROUPS[1 + min(2, (3 * i) // max(n, 1))]
        else:
            out[name] = "lm"
    return out


class SchemaError(ValueError):
    """A Dataset or file that does not follow this schema (what and where named in the message)."""


def variable_dims(name: str, *, run: bool = True) -> tuple[str, ...]:
    """The dims of variable ``name`` in a run Dataset (``run``) or an evaluation Dataset (no ``step``)."""
    dims = VARIABLES[name].dims
    return dims if run else tuple(d for d in dims if d != "step")


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """Attach ``long_name``, ``description`` and ``units`` to every known variable (in place; returned)."""
    for name, var in VARIABLES.items():
        if name in ds:
            ds[name].attrs.update(long_name=var.long_name, description=var.description, units=var.units)
    return ds


def validate(obj: xr.Dataset | xr.DataArray, *, where: str = "") -> xr.Dataset | xr.DataArray:
    """Check a Dataset (or one named DataArray) against the schema and return it; raise :class:`SchemaError`
    naming the first variable, coordinate or attribute that does not fit, and who produced it (``where``).

    Checked: every data variable is a schema variable with the schema's dims (``step`` may be absent, and
    dims that are not schema dims — a ``combine`` dim — may come first), with ``long_name`` and ``units``,
    numeric or text as declared; every schema coordinate sits on its own dims; ``instance`` ids are unique; a
    Dataset carries this ``schema_version`` attr, and the ``sign_convention`` attr when it holds G-effects."""
    ds = obj.to_dataset() if isinstance(obj, xr.DataArray) else obj
    who = f" ({where})" if where else ""
    if isinstance(obj, xr.Dataset):
        version = ds.attrs.get("schema_version")
        if version is None or int(version) != SCHEMA_VERSION:
            raise SchemaError(f"schema_version attribute is {version!r}, expected {SCHEMA_VERSION}{who}")
        effects = {"g_effect", "g_effect_token", "pg_effect", "sample_effect", "update_effect"} & set(ds.data_vars)
        if effects and ds.attrs.get("sign_convention") != SIGN_CONVENTION:
            raise SchemaError(f"sign_convention attribute is missing or not {SIGN_CONVENTION!r}{who}")
    for name, da in ds.data_vars.items():
        _check_variable(str(name), da, who)
    for name, coord in ds.coords.items():
        want = COORDS.get(str(name))
        if want is not None and coord.dims != want and not (name == "step" and coord.dims == ()):
            raise SchemaError(f"coordinate {name!r} has dims {coord.dims}, the schema's are {want}{who}")
    if "instance" in ds.coords and ds.indexes["instance"].has_duplicates:
        dup = ds.indexes["instance"][ds.indexes["instance"].duplicated()][:3]
        raise SchemaError(f"instance ids repeat: {', '.join(map(str, dup))}{who}")
    return obj


def _check_variable(name: str, da: xr.DataArray, who: str) -> None:
    var = VARIABLES.get(name)
    if var is None:
        raise SchemaError(f"variable {name!r} is not in the schema (geffect_lab.schema.VARIABLES){who}")
    own = tuple(d for d in da.dims if d in DIMS)
    outer = tuple(d for d in da.dims if d not in DIMS)
    if da.dims != outer + own or own not in (var.dims, variable_dims(name, run=False)):
        raise SchemaError(f"variable {name!r} has dims {da.dims}; the schema's are {var.dims} (step optional, "
                          f"a combine dim first){who}")
    if not {"long_name", "units"} <= set(da.attrs):
        raise SchemaError(f"variable {name!r} has no long_name/units attrs: pass the Dataset through "
                          f"geffect_lab.schema.annotate{who}")
    numeric = np.issubdtype(da.dtype, np.number) or da.dtype == bool
    if (var.kind == "text") == numeric and da.size:
        raise SchemaError(f"variable {name!r} is {da.dtype}, the schema's kind is {var.kind}{who}")


# --------------------------------------------------------------------------------------------- upgrades
class SchemaUpgradeWarning(UserWarning):
    """A file written with an older schema version was read under this version's names (what changed is said)."""


def upgrade(ds: xr.Dataset, where: str = "") -> xr.Dataset:
    """A Dataset of an older schema version (:data:`UPGRADABLE_VERSIONS`) under this version's names, with a
    :class:`SchemaUpgradeWarning` saying what moved; numbers are never left under a name whose meaning changed.

    From version 1: its ``pg_effect`` (``<grad R(D), grad l_j>``, each forget sample's unweighted share of the forget
    term's gradient) becomes ``sample_effect`` (multiplied by the forget term's weight and divided by the step's
    number of forget samples, this version's definition, which sums over samples to the forget term's G-effect);
    the file holds no paper PG-effect. Its ``extraction_strength_similar`` (ROUGE-L rule) becomes
    ``extraction_strength_similar_rouge``. The attr ``schema_upgraded_from`` keeps the version read. A Dataset of
    this version is returned as it is.

    Returns
    -------
    xarray.Dataset
        ``ds`` under this version's names: e.g. ``sample_effect`` [step, sample, against] where version 1 had
        ``pg_effect``, ``extraction_strength_similar_rouge`` [step, instance] where it had
        ``extraction_strength_similar``.
    """
    import warnings

    version = ds.attrs.get("schema_version")
    if version is None or int(version) == SCHEMA_VERSION:
        return ds
    if int(version) not in UPGRADABLE_VERSIONS:
        raise SchemaError(f"{where or 'this Dataset'} was written with results schema version {int(version)}; this "
                          f"geffect-lab reads schema versions {', '.join(map(str, UPGRADABLE_VERSIONS))} and "
                          f"{SCHEMA_VERSION}. Re-run it, or load it with the geffect-lab release that wrote it.")
    ds = ds.copy()
    notes = []
    if "pg_effect" in ds:
        share = ds["pg_effect"]
        weight = _forget_weight(ds)
        if weight is None:
            ds = ds.drop_vars("pg_effect")
            notes.append("its 'pg_effect' (each forget sample's share of the forget term's gradient, not the paper's "
                         "PG-effect) was left out: the forget term's weight could not be read to rescale it as "
                         "'sample_effect'")
        else:
            n = np.isfinite(share).sum("sample")
            ds["sample_effect"] = (share * weight / n.where(n > 0)).transpose(*share.dims)
            ds = ds.drop_vars("pg_effect")
            notes.append("its 'pg_effect' is each forget sample's share of the forget term's gradient, not the "
                         "paper's PG-effect: it has been renamed 'sample_effect' (times the forget term's weight, "
                         "divided by the step's number of forget samples, so that it sums over samples to the forget "
                         "term's G-effect). The file holds no paper PG-effect; measure again for 'pg_effect'")
    if "extraction_strength_similar" in ds:
        ds = ds.rename_vars(extraction_strength_similar="extraction_strength_similar_rouge")
        notes.append("its 'extraction_strength_similar' (the ROUGE-L rule) has been renamed "
                     "'extraction_strength_similar_rouge'; 'extraction_strength_similar' is now the paper's LCS rule")
    ds.attrs["schema_version"] = SCHEMA_VERSION
    ds.attrs["schema_upgraded_from"] = int(version)
    if notes:
        warnings.warn(f"{where or 'a Dataset'} was written with results schema version {int(version)}; "
                      + "; ".join(notes) + ".", SchemaUpgradeWarning, stacklevel=3)
    return ds


def _forget_weight(ds: xr.Dataset):
    """The forget term's weight in a version-1 Dataset: read from the ``objective`` attr (``0.5*npo+gd``; the forget
    term sits where ``term`` has ``"forget"``) and ``objective_params`` (``{"npo.weight": 0.5}``), else derived
    per step from ``term_loss`` (weight × mean_j l_j) over the mean of ``sample_loss`` (l_j); None if neither."""
    import json

    name = str(ds.attrs.get("objective", ""))
    terms = [str(t) for t in ds["term"].values] if "term" in ds.coords else []
    parts = name.split("+")
    if name and "forget" in terms and len(parts) == len(terms):
        weight, _, term = parts[terms.index("forget")].strip().rpartition("*")
        try:
            params = json.loads(ds.attrs.get("objective_params") or "{}")
        except (TypeError, ValueError):
            params = {}
        if isinstance(params, dict) and isinstance(params.get(f"{term}.weight"), (int, float)):
            return float(params[f"{term}.weight"])
        try:
            return float(weight) if weight else 1.0
        except ValueError:
            pass
    if {"term_loss", "sample_loss"} <= set(ds.data_vars) and "forget" in terms:
        mean = ds["sample_loss"].mean("sample", skipna=True)
        ratio = ds["term_loss"].sel(term="forget", drop=True) / mean.where(mean != 0)
        if bool(np.isfinite(ratio).any()):
            return ratio
    return None
