"""Models whose weights accelerate keeps off the model between calls (``cpu_offload``, ``disk_offload``, a
``device_map`` with ``"cpu"``/``"disk"`` entries).

Between calls such a model's parameters sit on the meta device; at each call accelerate's ``AlignDevicesHook``
swaps in *new* tensors from its weights map and drops them afterwards. A gradient taken over those transient
tensors reaches no parameter the engine can name, and tied weights come back as separate tensors. The engine
therefore measures an offloaded model inside :func:`resident`: every offloaded tensor is placed on its hook's
execution device once, as one parameter object for the whole measurement (tied weights as one), the hooks stop
swapping, and on exit the weights go back to the meta device and the hooks offload again. The numbers are then
those of the same model in one piece; the price is that the whole model sits on the execution device during the
measurement (the engine's directions take as much memory again per objective term, see ``gl.estimate_memory``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["resident", "offload_hooks", "is_offloaded"]


def _align_hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return [h for h in getattr(hook, "hooks", [hook]) if hasattr(h, "weights_map") and hasattr(h, "offload")]


def offload_hooks(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """``(module, hook)`` for every accelerate hook on ``model`` that offloads its module's weights."""
    return [(m, h) for m in model.modules() for h in _align_hooks(m) if h.offload]


def is_offloaded(model: nn.Module) -> bool:
    return bool(offload_hooks(model))


def _hooked_tensors(module: nn.Module, hook) -> list[str]:
    from accelerate.utils import named_module_tensors

    return [name for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                     recurse=hook.place_submodules, remove_non_persistent=True)]


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


@contextmanager
def resident(model: nn.Module) -> Iterator[nn.Module]:
    """Offloaded weights held on the model for the block (a no-op for a model that is not offloaded, and when
    already inside). See the module's docstring."""
    hooked = offload_hooks(model)
    if not hooked:
        yield model
        return
    from accelerate.utils import set_module_tensor_to_device

    placed: list[tuple[nn.Module, object, list[str]]] = []
    by_storage: dict[tuple[int, torch.device], nn.Parameter] = {}
    try:
        for module, hook in hooked:
            names = _hooked_tensors(module, hook)
            for name in names:
                value = hook.weights_map[name]
                owner, leaf = _owner(module, name)
                key = (value.data_ptr(), torch.device(hook.execution_device))
                if leaf in owner._parameters and key in by_storage and value.data_ptr() != 0:
                    owner._parameters[leaf] = by_storage[key]  # a tied weight: the same parameter object
                    continue
                set_module_tensor_to_device(module, name, hook.execution_device, value=value)
                if leaf in owner._parameters:
                    by_storage[key] = owner._parameters[leaf]
            hook.offload = False
            placed.append((module, hook, names))
        _retie(model)
        yield model
    finally:
        for module, hook, names in placed:
            for name in names:
                set_module_tensor_to_device(module, name, "meta")
            hook.offload = True


def _retie(model: nn.Module) -> None:
    """Ties the weights map could not show (a disk offload loads each tensor on its own): transformers' own
    ``{target: source}`` map of tied parameters."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        src_owner, src_leaf = _owner(model, source)
        dst_owner, dst_leaf = _owner(model, target)
        src = src_owner._parameters.get(src_leaf)
        if src is not None and dst_leaf in dst_owner._parameters and dst_owner._parameters[dst_leaf] is not src:
            dst_owner._parameters[dst_leaf] = src
