"""Session fixtures: the bundled world, its tokenizer and the zoo models, each loaded once."""

from __future__ import annotations

import os

import pytest
import torch

import geffect_lab as gl
from geffect_lab.data import data_dir, tofu_dir

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def world():
    return gl.load_world()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data_dir() / "tokenizer")


@pytest.fixture(scope="session")
def tofu_path():
    path = tofu_dir()
    if not (path / "full.json").exists():
        pytest.skip(f"the real TOFU files are not at {path}; set GEFFECT_TOFU_DIR to the folder holding them")
    return path


@pytest.fixture(scope="session")
def target():
    return gl.zoo.load("target")


@pytest.fixture(scope="session")
def target_gpt2():
    return gl.zoo.load("target-gpt2")
