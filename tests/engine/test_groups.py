"""Layer groups: every parameter in exactly one group, in model order, ties in embed."""

from __future__ import annotations

import pytest
from torch import nn

import geffect_lab as gl
from geffect_lab.engine import ModelStructureError, coarse_map
from geffect_lab.testing import tiny_model


def _sizes(model):
    groups = gl.layer_groups(model)
    sizes = dict.fromkeys(groups.names, 0)
    for _, p in groups.params(model):
        sizes[groups.names[groups.group_of(p)]] += p.numel()
    return groups, sizes


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_every_parameter_in_exactly_one_group(arch, tokenizer):
    model = tiny_model(arch, len(tokenizer), layers=3)
    groups, sizes = _sizes(model)
    assert groups.names == ("embed", "layers.0", "layers.1", "layers.2", "norm", "lm_head")
    assert groups.index == [-1, 0, 1, 2, 3, 4]
    distinct = {id(p): p for p in model.parameters()}
    assert sum(sizes.values()) == sum(p.numel() for p in distinct.values())
    assert all(sizes[f"layers.{i}"] > 0 for i in range(3)) and sizes["norm"] > 0


def test_llama_groups(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    groups, sizes = _sizes(model)
    assert groups.of_param[id(model.model.embed_tokens.weight)] == 0
    assert groups.names[groups.of_param[id(model.lm_head.weight)]] == "lm_head"
    assert sizes["norm"] == model.config.hidden_size


def test_gpt2_tied_embedding_belongs_to_embed(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    groups, sizes = _sizes(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert groups.names[groups.group_of(model.lm_head.weight)] == "embed"
    assert sizes["lm_head"] == 0
    # positional embeddings belong to embed too
    assert groups.names[groups.group_of(model.transformer.wpe.weight)] == "embed"
    assert sizes["norm"] == 2 * model.config.n_embd  # ln_f weight and bias


def test_a_model_without_blocks_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10)

        def get_input_embeddings(self):
            return self.emb

    with pytest.raises(ModelStructureError, match="no ModuleList of decoder blocks"):
        gl.layer_groups(Flat())


def test_coarse_groups_are_the_papers_five():
    names = ["embed"] + [f"layers.{i}" for i in range(6)] + ["norm", "lm_head"]
    mapping = coarse_map(names)
    assert [mapping[n] for n in names] == ["embed", "shallow", "shallow", "middle", "middle", "deep", "deep",
                                           "lm", "lm"]


def test_groups_follow_parameter_identity_not_names(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    groups = gl.layer_groups(model)
    block0 = model.model.layers[0]
    for p in block0.parameters():
        assert groups.names[groups.group_of(p)] == "layers.0"
