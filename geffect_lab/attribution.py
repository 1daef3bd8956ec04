"""Captum attributions beside the G-effect: which prompt tokens and which layers carry the answer.

The G-effect says where an objective *moves* the model; attributions say where the model *keeps* the answer it is
asked to forget. Both use the same instance ids and the same ``layer`` names, before and after unlearning.

>>> tok_attr = gl.attribution.tokens(model, tok, world["forget05"][:4])          # [instance, token, method]
>>> layer_attr = gl.attribution.layers(model, tok, world["forget05"][:4])        # [instance, layer]
>>> run = gl.unlearn(model, tok, "ga", attribute_at=[0, 10, 20])                 # stored along the run

**Token attributions** of the answer's log-probability ``Σ_k log p(a_k | q, a_<k)`` (or of an objective's
per-sample loss) to the prompt's tokens:

- ``integrated_gradients``: Captum's :class:`~captum.attr.LayerIntegratedGradients` on the input-embedding layer;
  the baseline replaces every prompt token (not the BOS, not the answer) by the pad token. Completeness:
  attributions sum to ``F(prompt) − F(baseline)`` up to the reported ``convergence_delta``.
- ``feature_ablation``: Captum's :class:`~captum.attr.FeatureAblation`, one prompt token at a time replaced by the
  pad token: ``F(prompt) − F(prompt without token i)``, a second opinion without gradients.

The default ``engine="batched"`` runs one attribution for all instances and all answer tokens at once. By
linearity it is exactly what Captum's ``LLMGradientAttribution(LayerIntegratedGradients)`` and
``LLMAttribution(FeatureAblation)`` report as ``seq_attr`` (they attribute one answer token at a time); those
wrappers run with ``engine="captum-llm"`` (answer log-probability only, slower), and the tests hold the two
engines to agreement.

**Layer attributions** (``layers``): Captum's :class:`~captum.attr.LayerGradientXActivation` (or
:class:`~captum.attr.LayerConductance`) of the answer's log-probability at the output of the embedding and of each
decoder block, summed over positions and hidden units, on the G-effect's ``layer`` coordinate (``norm`` and
``lm_head`` are not attributed: NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from ._batching import captured_output, check_number, eval_mode, model_device, pad_id
from .data import encode, example_field, example_id
from .engine.forward import answer_logp, hidden_reading, hidden_states_at
from .engine.groups import find_blocks, layer_groups
from .objectives import ObjectiveError, ObjectiveInputs, resolve_objective
from .schema import validate

__all__ = ["tokens", "layers", "TOKEN_METHODS", "LAYER_METHODS", "prompt_positions"]

TOKEN_METHODS = ("integrated_gradients", "feature_ablation")
LAYER_METHODS = ("gradient_x_activation", "conductance")


class _Target:
    """The scalar per instance that attributions explain: the answer log-probability, or an objective term's
    per-sample loss (with the reference quantities it needs taken from the model as it is now)."""

    def __init__(self, model, batch, target, params=None):
        self.model = model
        self.labels = batch["labels"]
        self.attention_mask = batch["attention_mask"]
        self.name = "answer_logprob"
        self.term = None
        if target != "answer_logprob":
            obj = resolve_objective(target, params)
            term = obj.forget_term
            if "alt" in term.spec.needs:
                raise ObjectiveError(f"attributions of {term.name!r} are not supported: it scores a second "
                                     "(refusal) answer, so the loss is not a function of one input sequence")
            from .engine.forward import resolve_layers

            self.term = resolve_layers(model, (term,))[0]
            self.name = f"objective:{self.term.name}"
            with torch.no_grad():
                self.reference = self._quantities(batch["input_ids"], reference=True)

    def _quantities(self, input_ids, reference=False):
        """``input_ids``: token ids [rows, position], or input embeddings [rows, position, d] (for methods that
        interpolate the model's inputs)."""
        reps = input_ids.shape[0] // self.labels.shape[0]
        labels = self.labels.repeat(reps, 1)
        mask = self.attention_mask.repeat(reps, 1)
        needs = self.term.spec.needs if self.term is not None else frozenset()
        hidden_layer, positions = hidden_reading(self.term) if self.term is not None else (None, "answer")
        block = find_blocks(self.model)[1][hidden_layer] if hidden_layer is not None else None
        feed = {"inputs_embeds": input_ids} if input_ids.is_floating_point() else {"input_ids": input_ids}
        with captured_output(block) as captured:
            logits = self.model(**feed, attention_mask=mask.to(input_ids.device)).logits
        logp, amask, full, pos = answer_logp(logits, labels.to(input_ids.device),
                                             full=bool(needs & {"full_logp", "ref_full_logp"}))
        out = {"logp": logp, "mask": amask, "full_logp": full}
        if captured:
            out["hidden"], out["hidden_mask"] = hidden_states_at(captured[-1], pos, amask,
                                                                 mask.to(input_ids.device), positions)
        if reference:
            return {f"ref_{k}": v.detach() for k, v in out.items() if v is not None}
        return out

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        q = self._quantities(input_ids)
        if self.term is None:
            return q["logp"].sum(-1)
        reps = input_ids.shape[0] // self.labels.shape[0]
        ref = {k: v.repeat(reps, *([1] * (v.dim() - 1))) for k, v in self.reference.items()
               if f"{k}" in ("ref_logp", "ref_full_logp", "ref_hidden") and k in self.term.spec.needs}
        inputs = ObjectiveInputs(logp=q["logp"], mask=q["mask"], full_logp=q.get("full_logp"),
                                 hidden=q.get("hidden"), hidden_mask=q.get("hidden_mask"), **ref)
        return self.term.spec.fn(inputs, **self.term.params)


def prompt_positions(batch, tokenizer) -> torch.Tensor:
    """[instance, position] bool: the prompt's tokens (not BOS, not the answer, not padding)."""
    ids = batch["input_ids"]
    prompt = (batch["labels"] == -100) & (batch["attention_mask"] == 1)
    if tokenizer.bos_token_id is not None:
        prompt &= ids != tokenizer.bos_token_id
    return prompt


def _baseline_id(tokenizer, baseline_token: int | None) -> int:
    if baseline_token is not None:
        return int(baseline_token)
    return pad_id(tokenizer)


def _to_prompt_axis(values: torch.Tensor, prompt: torch.Tensor, width: int) -> np.ndarray:
    """Per-position values [instance, position] → [instance, prompt token] (NaN past each prompt's end)."""
    out = np.full((values.shape[0], width), np.nan)
    for i in range(values.shape[0]):
        row = values[i][prompt[i]].double().cpu().numpy()
        out[i, :len(row)] = row
    return out


def tokens(model, tokenizer, instances: Sequence[Any], target="answer_logprob", *, params=None,
           methods: Sequence[str] = TOKEN_METHODS, n_steps: int = 64, baseline_token: int | None = None,
           engine: str = "batched", template=None, internal_batch_size: int | None = 512) -> xr.DataArray:
    """Attribution of each instance's answer log-probability (or of ``target``, an objective such as ``"npo"``,
    its per-sample loss) to its prompt tokens.

    Returns a DataArray ``[instance, prompt_token, method]`` (``prompt_token`` = position among the prompt's
    tokens, BOS left out) with coords ``prompt_token_text(instance, prompt_token)``, ``split``-free instance
    ids, and ``convergence_delta(instance)``: integrated gradients' completeness gap
    ``Σ attribution − (F(x) − F(baseline))`` (raise ``n_steps`` when it is large: saturated models need more).
    Select a method with ``da.sel({"method": "integrated_gradients"})`` — ``sel(method=...)`` is xarray's own keyword.
    """
    check_number("n_steps", n_steps, whole=True)
    check_number("internal_batch_size", internal_batch_size, whole=True, optional=True)
    unknown = set(methods) - set(TOKEN_METHODS)
    if unknown:
        raise ValueError(f"unknown attribution method(s) {sorted(unknown)}; use {', '.join(TOKEN_METHODS)}")
    if engine not in ("batched", "captum-llm"):
        raise ValueError(f"unknown engine {engine!r}; use 'batched' or 'captum-llm'")
    instances = list(instances)
    if not instances:
        raise ValueError("no instances to attribute")
    batch = encode(tokenizer, instances, template)
    device = model_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    prompt = prompt_positions(batch, tokenizer)
    width = max(int(prompt.sum(1).max()), 1)
    base_id = _baseline_id(tokenizer, baseline_token)
    baseline = torch.where(prompt, torch.full_like(batch["input_ids"], base_id), batch["input_ids"])
    results: dict[str, np.ndarray] = {}
    delta = np.full(len(instances), np.nan)
    with eval_mode(model):
        fn = _Target(model, batch, target, params)
        if engine == "captum-llm":
            if fn.term is not None:
                raise ValueError("engine='captum-llm' attributes the answer log-probability only; use the "
                                 "batched engine for objectives")
            results, delta = _captum_llm(model, tokenizer, instances, batch, prompt, methods, n_steps, base_id,
                                         width, template)
        else:
            if "integrated_gradients" in methods:
                from captum.attr import LayerIntegratedGradients

                lig = LayerIntegratedGradients(fn, model.get_input_embeddings())
                attr, gap = lig.attribute(batch["input_ids"], baselines=baseline, n_steps=n_steps,
                                          internal_batch_size=internal_batch_size, return_convergence_delta=True)
                per_position = attr.sum(-1).detach()
                results["integrated_gradients"] = _to_prompt_axis(per_position, prompt, width)
                delta = gap.detach().double().cpu().numpy()
            if "feature_ablation" in methods:
                from captum.attr import FeatureAblation

                # each prompt token its own feature; everything else one feature whose baseline is itself
                rank = prompt.long().cumsum(1) * prompt.long()
                with torch.no_grad():
                    attr = FeatureAblation(fn).attribute(batch["input_ids"], baselines=baseline, feature_mask=rank,
                                                         perturbations_per_eval=1)
                results["feature_ablation"] = _to_prompt_axis(attr.detach(), prompt, width)
    texts = np.full((len(instances), width), "", dtype=object)
    for i in range(len(instances)):
        ids = batch["input_ids"][i][prompt[i]].tolist()
        for k, t in enumerate(ids):
            texts[i, k] = tokenizer.decode([t])
    order = [m for m in TOKEN_METHODS if m in results]
    data = np.stack([results[m] for m in order], axis=-1)
    da = xr.DataArray(
        data, dims=("instance", "prompt_token", "method"),
        coords={"instance": np.array([example_id(e, i) for i, e in enumerate(instances)], dtype=object),
                "prompt_token": np.arange(width), "method": np.array(order, dtype=object),
                "prompt_token_text": (("instance", "prompt_token"), texts),
                "question": ("instance", np.array([example_field(e, "question") for e in instances], dtype=object)),
                "convergence_delta": ("instance", delta)},
        name="token_attribution",
        attrs={"long_name": "token attribution", "units": "nat",
               "description": f"attribution of {fn.name} to each prompt token (Captum; baseline: the pad token)",
               "target": fn.name, "n_steps": n_steps, "engine": engine})
    return validate(da, where="attribution.tokens")


def _captum_llm(model, tokenizer, instances, batch, prompt, methods, n_steps, base_id, width, template):
    """Captum's LLM wrappers, one instance (and, for gradients, one answer token) at a time."""
    from captum.attr import (
        FeatureAblation,
        LayerIntegratedGradients,
        LLMAttribution,
        LLMGradientAttribution,
        TextTokenInput,
    )

    from .data import resolve_template

    tpl = resolve_template(template)
    skip = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else None
    results = {m: np.full((len(instances), width), np.nan) for m in methods}
    delta = np.full(len(instances), np.nan)
    lig = LLMGradientAttribution(LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
    fa = LLMAttribution(FeatureAblation(model), tokenizer)
    for i, e in enumerate(instances):
        text = tpl.prompt.format(question=example_field(e, "question"))
        inp = TextTokenInput(text, tokenizer, baselines=base_id, skip_tokens=skip)
        labels = batch["labels"][i]
        answer = labels[labels != -100]
        if "integrated_gradients" in methods:
            res = lig.attribute(inp, target=answer, n_steps=n_steps)
            values = res.seq_attr.detach().double().cpu().numpy()
            results["integrated_gradients"][i, :len(values)] = values
        if "feature_ablation" in methods:
            with torch.no_grad():
                res = fa.attribute(inp, target=answer, forward_in_tokens=False)
            values = res.seq_attr.detach().double().cpu().numpy()
            results["feature_ablation"][i, :len(values)] = values
    return results, delta


def layers(model, tokenizer, instances: Sequence[Any], *, method: str = "gradient_x_activation",
           n_steps: int = 32, template=None) -> xr.DataArray:
    """Attribution of each instance's answer log-probability to the output of the embedding layer and of each
    decoder block (summed over positions and hidden units): ``[instance, layer]`` on the G-effect's layer names.

    ``gradient_x_activation``: Captum's ``LayerGradientXActivation`` (one backward for every layer);
    ``conductance``: ``LayerConductance`` per layer (``n_steps`` interpolation steps each).
    """
    from captum.attr import LayerConductance, LayerGradientXActivation

    if method not in LAYER_METHODS:
        raise ValueError(f"unknown layer attribution method {method!r}; use {', '.join(LAYER_METHODS)}")
    check_number("n_steps", n_steps, whole=True)
    instances = list(instances)
    batch = {k: v.to(model_device(model)) for k, v in encode(tokenizer, instances, template).items()}
    groups = layer_groups(model)
    blocks = list(find_blocks(model)[1])
    modules = [model.get_input_embeddings()] + blocks
    names = ["embed"] + [f"layers.{i}" for i in range(len(blocks))]
    valid = batch["attention_mask"].bool()
    values: dict[str, np.ndarray] = {}
    with eval_mode(model):
        fn = _Target(model, batch, "answer_logprob")
        if method == "gradient_x_activation":
            attrs = LayerGradientXActivation(fn, modules).attribute(batch["input_ids"])
            for name, attr in zip(names, attrs):
                attr = attr[0] if isinstance(attr, tuple) else attr
                values[name] = (attr.sum(-1) * valid).sum(-1).detach().double().cpu().numpy()
        else:
            # conductance interpolates the model's inputs: feed embeddings, the prompt's going to the pad token's
            embed = model.get_input_embeddings()
            prompt = prompt_positions(batch, tokenizer)
            base_ids = torch.where(prompt, torch.full_like(batch["input_ids"], _baseline_id(tokenizer, None)),
                                   batch["input_ids"])
            with torch.no_grad():
                inputs, baseline = embed(batch["input_ids"]), embed(base_ids)
            for name, module in zip(names, modules):
                if name == "embed":  # the embedding output is the input itself: conductance = input IG
                    from captum.attr import IntegratedGradients

                    attr = IntegratedGradients(fn).attribute(inputs, baselines=baseline, n_steps=n_steps)
                else:
                    attr = LayerConductance(fn, module).attribute(inputs, baselines=baseline, n_steps=n_steps)
                attr = attr[0] if isinstance(attr, tuple) else attr
                values[name] = (attr.sum(-1) * valid).sum(-1).detach().double().cpu().numpy()
    data = np.full((len(instances), len(groups.names)), np.nan)
    for j, name in enumerate(groups.names):
        if name in values:
            data[:, j] = values[name]
    return validate(xr.DataArray(
        data, dims=("instance", "layer"),
        coords={"instance": np.array([example_id(e, i) for i, e in enumerate(instances)], dtype=object),
                "layer": np.array(groups.names, dtype=object), "layer_index": ("layer", np.array(groups.index))},
        name="layer_attribution",
        attrs={"long_name": "layer attribution", "method": method, "units": "nat",
               "description": f"Captum {method} of the answer log-probability at each layer's output, summed over "
                              "positions and hidden units (norm and lm_head: not attributed)"}),
        where="attribution.layers")
