"""The result contract: one xarray Dataset per measurement or run (DESIGN.md §4).

Dims ``step``, ``instance``, ``layer``, ``token``, ``term``, ``sample``, ``against``; every variable carries
``long_name`` and ``description``; attrs are flat and netCDF-safe (nested configuration as JSON strings).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["SCHEMA_VERSION", "SIGN_CONVENTION", "VARIABLES", "effects_dataset", "flat_attrs", "annotate"]

SCHEMA_VERSION = 1
SIGN_CONVENTION = "dR ≈ -lr * g_effect; g_effect < 0 raises the risk"

# name -> (long_name, description, units)
VARIABLES: dict[str, tuple[str, str]] = {
    "g_effect": ("G-effect", "e_{i,l} = <grad_{theta_l} R_i, grad_{theta_l} L_u(term)>: the inner product of "
                             "instance i's risk gradient with the objective term's gradient, restricted to the "
                             "parameters of layer group l. Sums over layer and term to the instance's G-effect."),
    "g_effect_token": ("token G-effect", "e_{i,k} = <grad r_{i,k}, grad L_u>: the G-effect of answer token k's "
                                         "NLL (all layers, all terms); its mean over tokens is the instance's "
                                         "G-effect."),
    "pg_effect": ("PG-effect", "pg_j = <grad R(D), grad l_j>: the forget term's per-sample gradient against the "
                               "mean risk gradient of the target set named by 'against' (the paper's Eq. 5)."),
    "update_effect": ("update effect", "<grad_{theta_l} R_i, -delta theta_t / lr>: the inner product with the "
                                       "optimiser's actual step; equals the G-effect under plain SGD."),
    "risk": ("risk", "R_i: mean negative log-likelihood of instance i's answer tokens."),
    "objective_loss": ("objective loss", "L_u: the unlearning objective's value (sum of its weighted terms)."),
    "term_loss": ("term loss", "weight * mean over samples of the term's per-sample loss."),
    "sample_loss": ("sample loss", "l_j: the forget term's loss on forget sample j (unweighted)."),
    "token_count": ("answer tokens", "number of answer tokens of the instance (the risk's denominator)."),
}


def flat_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """netCDF-safe attrs: str/int/float stay, bools become ints, anything nested becomes a JSON string."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (str, int, float, np.integer, np.floating)):
            out[key] = value.item() if isinstance(value, np.generic) else value
        elif value is None:
            out[key] = ""
        else:
            out[key] = json.dumps(value, default=str, sort_keys=True)
    return out


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """Attach ``long_name``/``description`` to every known variable."""
    for name, (long_name, description) in VARIABLES.items():
        if name in ds:
            ds[name].attrs.update(long_name=long_name, description=description)
    return ds


def effects_dataset(effects, *, instance_ids: Sequence[str], splits: Sequence[str],
                    questions: Sequence[str], answers: Sequence[str], layer_names: Sequence[str],
                    layer_index: Sequence[int], term_names: Sequence[str], sample_ids: Sequence[str],
                    against: Sequence[str], token_texts: Sequence[Sequence[str]], step: int = 0,
                    attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """A one-step Dataset from an engine's :class:`~geffect_lab.engine.core.Effects`."""
    n_tok = effects.g_effect_token.shape[1]
    tok_text = np.full((len(instance_ids), n_tok), "", dtype=object)
    for i, texts in enumerate(token_texts):
        for k, t in enumerate(texts[:n_tok]):
            tok_text[i, k] = t
    data_vars = {
        "g_effect": (("step", "instance", "layer", "term"), effects.g_effect[None]),
        "g_effect_token": (("step", "instance", "token"), effects.g_effect_token[None]),
        "risk": (("step", "instance"), effects.risk[None]),
        "objective_loss": (("step",), np.array([effects.term_loss.sum()])),
        "term_loss": (("step", "term"), effects.term_loss[None]),
        "sample_loss": (("step", "sample"), effects.sample_loss[None]),
        "token_count": (("instance",), effects.token_count.astype(np.int64)),
    }
    if effects.pg_effect is not None:
        data_vars["pg_effect"] = (("step", "sample", "against"), effects.pg_effect[None])
    coords = {
        "step": ("step", np.array([step], dtype=np.int64)),
        "instance": ("instance", np.array(instance_ids, dtype=object)),
        "split": ("instance", np.array(splits, dtype=object)),
        "question": ("instance", np.array(questions, dtype=object)),
        "answer": ("instance", np.array(answers, dtype=object)),
        "layer": ("layer", np.array(layer_names, dtype=object)),
        "layer_index": ("layer", np.array(layer_index, dtype=np.int64)),
        "term": ("term", np.array(term_names, dtype=object)),
        "token": ("token", np.arange(n_tok, dtype=np.int64)),
        "token_text": (("instance", "token"), tok_text),
        "sample": ("sample", np.array(sample_ids, dtype=object)),
        "against": ("against", np.array(against, dtype=object)),
    }
    ds = xr.Dataset(data_vars, coords=coords)
    base = {"schema_version": SCHEMA_VERSION, "sign_convention": SIGN_CONVENTION}
    ds.attrs.update(flat_attrs({**base, **(attrs or {})}))
    return annotate(ds)
