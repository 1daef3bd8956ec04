"""The G-effect engine: layer groups, the fast ghost-dot-product engine and the per-instance oracle."""

from .api import Measurement, g_effect
from .core import Effects, fast_effects, reference_effects, risk_gradient, term_gradients
from .ghost import GhostPass
from .groups import LayerGroups, ModelStructureError, coarse_map, find_blocks, layer_groups

__all__ = ["g_effect", "Measurement", "Effects", "fast_effects", "reference_effects", "risk_gradient", "term_gradients",
           "GhostPass", "LayerGroups", "ModelStructureError", "coarse_map", "find_blocks", "layer_groups"]
