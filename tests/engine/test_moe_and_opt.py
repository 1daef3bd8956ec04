"""The two families issue 24 found refused, exact against the per-instance oracle: fused mixture-of-experts
modules (Mixtral, Qwen2-MoE: a routing-aware closed formula) and OPT (a tied embedding whose padding_idx is a
real token), in float64 and float32; what still has no formula is still refused by name."""

from __future__ import annotations

import pytest
import torch

import geffect_lab as gl
from geffect_lab.testing import float64_throughout, relative_error, reorder_tolerance

QUANTITIES = ("g_effect", "pg_effect", "sample_effect", "g_effect_token")
SMALL = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


@pytest.fixture(scope="module")
def few(world):
    """Short and long answers (padded batches), few tokens: the oracle takes one backward per answer token."""
    return dict(forget=world["forget01"][:1] + world["world_facts"][:1], retain=world["retain_perturbed"][:1],
                targets={"targeted": world["forget01"][2:3] + world["world_facts"][1:2],
                         "non_targeted": world["world_facts"][60:61]})


def _errors(model, tok, few, **kw) -> dict[str, float]:
    args = dict(forget=few["forget"], retain=few["retain"], targets=few["targets"], chunk_size=4, **kw)
    fast = gl.g_effect(model, tok, "npo+gd", **args)
    ref = gl.g_effect(model, tok, "npo+gd", engine="reference", **args)
    assert abs(fast.g_effect).max() > 0
    return {k: relative_error(fast[k], ref[k]) for k in QUANTITIES}


def _padded_at_bos(family: str, vocab: int, dtype: torch.dtype):
    """Tied embeddings whose padding_idx (1) is the bundled tokenizer's BOS, a token of every row: OPT's own
    defaults (pad 1, tied), and Gemma's scaled embedding (an nn.Embedding subclass: the jvp path) set the same."""
    from transformers import GemmaConfig, GemmaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if family == "opt":
        config = OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                           max_position_embeddings=256, dropout=0.0)
        assert config.pad_token_id == 1 and config.tie_word_embeddings
        model = OPTForCausalLM._from_config(config, attn_implementation="sdpa")
    else:
        config = GemmaConfig(**{**SMALL, "intermediate_size": 64}, vocab_size=vocab, pad_token_id=1, bos_token_id=1,
                             eos_token_id=2)
        model = GemmaForCausalLM._from_config(config, attn_implementation="sdpa")
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("family", ["opt", "gemma"])
def test_a_padding_idx_that_is_a_real_token_is_exact(family, dtype, tokenizer, few):
    """torch's embedding backward gives the padding row no gradient from a lookup, its forward mode does: the
    engine follows the backward (this was OPT's refusal: 'embed' differed from the plain backward)."""
    model = _padded_at_bos(family, len(tokenizer), dtype)
    assert tokenizer.bos_token_id == model.get_input_embeddings().padding_idx
    with float64_throughout():
        errors = _errors(model, tokenizer, few)
    assert max(errors.values()) <= (1e-12 if dtype == torch.float64 else reorder_tolerance(torch.float32)), errors
