"""Unlearning objectives: a registry of per-sample loss functions (see :mod:`.registry`) and the built-ins
of Wang et al. (ICLR 2025) in :mod:`.builtin`."""

from . import builtin
from .builtin import ceu, dpo, ga, gd, kl, npo, po, rmu, rr, satimp, simnpo, tnpo, wga, wtnpo
from .open_unlearning import OPEN_UNLEARNING_METHODS, from_open_unlearning
from .registry import (
    NEEDS,
    Objective,
    ObjectiveError,
    ObjectiveInputs,
    ObjectiveSpec,
    Term,
    get_objective,
    list_objectives,
    objective,
    remove_objective,
    resolve_objective,
)

__all__ = ["NEEDS", "Objective", "ObjectiveError", "ObjectiveInputs", "ObjectiveSpec", "Term", "builtin",
           "get_objective", "list_objectives", "objective", "remove_objective", "resolve_objective", "ga", "wga",
           "npo", "simnpo", "tnpo", "wtnpo", "po", "dpo", "rmu", "gd", "kl", "rr", "satimp", "ceu",
           "from_open_unlearning", "OPEN_UNLEARNING_METHODS"]
