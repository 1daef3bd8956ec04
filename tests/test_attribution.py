"""Captum attributions: completeness, agreement with Captum's LLM wrappers, a constructed case, runs, plots."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import geffect_lab as gl
from geffect_lab import attribution, plots
from geffect_lab.objectives import ObjectiveError

IG = {"method": "integrated_gradients"}
FA = {"method": "feature_ablation"}


def _answer_logprob(model, tok, example, prompt_ids):
    answer = gl.encode(tok, [example])["labels"][0]
    answer = answer[answer != -100]
    ids = torch.cat([prompt_ids, answer])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1], -1)
    return float(logp[torch.arange(len(answer)), answer].sum())


def test_integrated_gradients_is_complete(target, world):
    """Σ attributions = F(prompt) − F(baseline prompt) up to the convergence delta, which is small."""
    model, tok = target
    examples = world["forget05"][:2]
    da = attribution.tokens(model, tok, examples, methods=("integrated_gradients",), n_steps=512)
    for i, e in enumerate(examples):
        ids = torch.tensor(tok(gl.data.DEFAULT_TEMPLATE.prompt.format(question=e.question))["input_ids"])
        base = ids.clone()
        base[1:] = tok.pad_token_id  # every prompt token but BOS
        gap = _answer_logprob(model, tok, e, ids) - _answer_logprob(model, tok, e, base)
        total = float(np.nansum(da.sel(IG).values[i]))
        assert abs(total - gap) <= 1e-3 * abs(gap)  # the zoo model is saturated: sharp paths need many steps
        assert float(da.convergence_delta[i]) == pytest.approx(total - gap, abs=1e-3 * abs(gap))


def test_batched_engine_matches_captums_llm_wrappers(target, world):
    """The batched attributions are exactly Captum's LLMGradientAttribution(LayerIntegratedGradients) and
    LLMAttribution(FeatureAblation) sequence attributions, which run one answer token at a time."""
    model, tok = target
    examples = world["forget05"][:2] + world["world_facts"][:1]
    ours = attribution.tokens(model, tok, examples, n_steps=16)
    captum = attribution.tokens(model, tok, examples, n_steps=16, engine="captum-llm")
    assert ours.dims == ("instance", "prompt_token", "method")
    np.testing.assert_allclose(ours.values, captum.values, rtol=1e-4, atol=1e-5 * np.nanmax(np.abs(captum.values)))
    assert "".join(ours.prompt_token_text.values[0]) == gl.data.DEFAULT_TEMPLATE.prompt.format(
        question=examples[0].question)


class Bigram(nn.Module):
    """A constructed LM whose next-token logits depend on the current token only."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, vocab)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **_):
        x = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        return SimpleNamespace(logits=self.head(torch.tanh(x)))


@pytest.mark.parametrize("engine", ["batched", "captum-llm"])
def test_a_token_the_answer_does_not_depend_on_gets_zero(tokenizer, world, engine):
    """In a bigram LM the answer depends on the last prompt token only: every other prompt token gets 0."""
    model = Bigram(len(tokenizer))
    da = attribution.tokens(model, tokenizer, world["forget05"][:2], n_steps=16, engine=engine)
    for i in range(2):
        n = int(np.isfinite(da.sel(IG).values[i]).sum())
        for method in (IG, FA):
            row = da.sel(method).values[i][:n]
            np.testing.assert_allclose(row[:-1], 0.0, atol=1e-6)
            assert abs(row[-1]) > 1e-3


def test_objective_targets(target, world):
    model, tok = target
    da = attribution.tokens(model, tok, world["forget05"][:2], target="npo", n_steps=8)
    assert da.attrs["target"] == "objective:npo" and np.isfinite(da.sel(IG).values[:, :5]).all()
    with pytest.raises(ObjectiveError, match="'po' are not supported"):
        attribution.tokens(model, tok, world["forget05"][:2], target="po")
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribution.tokens(model, tok, world["forget05"][:2], methods=("saliency",))


def test_layer_attribution_uses_the_g_effect_layers(target, world):
    model, tok = target
    examples = world["forget05"][:2]
    da = attribution.layers(model, tok, examples)
    assert list(da.layer.values) == list(gl.layer_groups(model).names)
    assert np.isfinite(da.sel(layer=["embed", "layers.0", "layers.3"])).all()
    assert np.isnan(da.sel(layer=["norm", "lm_head"])).all()
    conductance = attribution.layers(model, tok, examples[:1], method="conductance", n_steps=8)
    assert np.isfinite(conductance.sel(layer="layers.1")).all()


@pytest.fixture(scope="module")
def attributed_run(target, world):
    model, tok = target
    ev = {"targeted": world["forget05"][:3], "non_targeted": world["retain_perturbed"][:3]}
    return gl.unlearn(model, tok, "ga", world=world, eval=ev, steps=10, lr=1e-3, record=("g_effect",),
                      attribute_at=[0, 10], attribute_n_steps=16, progress=False)


def test_attributions_along_a_run_align_with_its_dataset(attributed_run, world):
    ds = attributed_run
    assert ds.token_attribution.dims == ("step", "instance", "prompt_token", "method")
    assert list(ds.layer_attribution.layer.values) == list(ds.g_effect.layer.values)
    attributed = ds.token_attribution.notnull().any(["instance", "prompt_token", "method"])
    assert list(ds.step.values[attributed.values]) == [0, 10]
    first = str(ds.instance.values[0])
    assert "".join(ds.prompt_token_text.sel(instance=first).values) == gl.data.DEFAULT_TEMPLATE.prompt.format(
        question=world["forget05"][0].question)
    assert gl.load(gl.save(ds, "/tmp/geffect_attr_run.nc")).identical(ds)


def test_the_attribution_of_an_instance_changes_after_ga(attributed_run):
    ds = attributed_run
    before = ds.token_attribution.sel({"step": 0, "method": "feature_ablation"}).isel(instance=0).values
    after = ds.token_attribution.sel({"step": 10, "method": "feature_ablation"}).isel(instance=0).values
    keep = np.isfinite(before)
    # before: only the prompt's last token matters to the saturated model; after GA, most tokens do
    assert np.abs(after[keep] - before[keep]).max() > 3 * np.abs(before[keep]).max()
    assert (np.abs(before[keep]) > 0.1).mean() <= 0.2 and (np.abs(after[keep]) > 0.1).mean() >= 0.5
    layer_before = ds.layer_attribution.sel(step=0).isel(instance=0).values
    layer_after = ds.layer_attribution.sel(step=10).isel(instance=0).values
    assert not np.allclose(layer_before[:5], layer_after[:5])


def test_attribution_plots(attributed_run, target, world):
    ds = attributed_run
    inst = str(ds.instance.values[0])
    fig = plots.token_attribution(ds, instance=inst)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["step 0", "step 10"]
    cell_texts = {t.get_text() for t in fig.axes[0].texts}
    assert {" fantasy", " born"} <= cell_texts
    change = plots.attribution_change(ds, inst)
    assert [t.get_text() for t in change.axes[0].get_yticklabels()] == ["step 0", "step 10", "after - before"]
    beside = plots.layer_attribution(ds, inst, step=0)
    assert [t.get_text() for t in beside.axes[0].get_yticklabels()] == list(ds.layer.values)
    model, tok = target
    standalone = plots.token_attribution(attribution.tokens(model, tok, world["forget05"][:2], n_steps=8))
    assert len(standalone.axes[0].get_yticklabels()) == 2
