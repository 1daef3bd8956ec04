"""Tiny random float64 models, built once per session, and the instances they are measured on."""

from __future__ import annotations

import pytest

from geffect_lab.testing import tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return tiny_model("llama", len(tokenizer))


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer):
    return tiny_model("gpt2", len(tokenizer))


@pytest.fixture(scope="session")
def tiny_sets(world):
    """Mixed answer lengths (world facts are short, author answers long), so batches are padded."""
    forget = world["forget01"][:2] + world["world_facts"][:1]
    return {
        "forget": forget,
        "retain": world["retain_perturbed"][:3],
        "targets": {"targeted": world["forget01"][2:4] + world["world_facts"][1:2],
                    "non_targeted": world["retain_perturbed"][10:12] + world["world_facts"][60:61]},
    }
