"""The built-in objectives of the paper (forget terms) and the regularisers (retain terms).

Notation (``x`` is the :class:`ObjectiveInputs`): ``p_k`` the model's probability of answer token k,
``p_o,k`` the frozen reference's, ``nll_k = -log p_k``; ``sg`` is stop-gradient (``.detach()``). Means and
sums run over each sample's answer tokens. Every function returns one loss per sample.

Token-level objectives take ``pooled=False``: ``True`` replaces the per-sample token mean by each sample's share
of the token mean over the whole batch (:meth:`ObjectiveInputs.pooled`), the convention of trainers that
average token losses across a batch, so the engine's mean over samples equals that batch token mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import ObjectiveInputs, objective


def _seq_logp(x: ObjectiveInputs) -> torch.Tensor:
    return x.sum(x.logp)


@objective("ga")
def ga(x: ObjectiveInputs) -> torch.Tensor:
    """Gradient ascent: ℓ = -mean_k nll_k (``wga(alpha=0, pooled=True)`` is its token mean over the batch)."""
    return -x.mean(x.nll)


def _wga_weight(x: ObjectiveInputs, alpha: float = 1.0, pooled: bool = False) -> torch.Tensor:
    return x.mean(torch.exp(alpha * x.logp))


@objective("wga", weight=_wga_weight, bounds={"alpha": ">= 0"})
def wga(x: ObjectiveInputs, alpha: float = 1.0, pooled: bool = False) -> torch.Tensor:
    """Weighted gradient ascent: ℓ = -mean_k sg(p_k)^α · nll_k (``pooled``: the token mean over the batch)."""
    weight = torch.exp(alpha * x.logp).detach()
    return -x.token_mean(weight * x.nll, pooled=pooled)


def _npo_weight(x: ObjectiveInputs, beta: float = 0.1) -> torch.Tensor:
    return 2.0 * torch.sigmoid(beta * (_seq_logp(x) - x.sum(x.ref_logp)))


@objective("npo", needs=("ref_logp",), weight=_npo_weight, bounds={"beta": "> 0"})
def npo(x: ObjectiveInputs, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation: ℓ = -(2/β)·logsigmoid(-β·(Σ_k log p_k − Σ_k log p_o,k)).

    Its gradient is GA's (on the sequence log-probability) times the weight 2p^β/(p^β+p_o^β), p = Π_k p_k.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (_seq_logp(x) - x.sum(x.ref_logp)))


def _simnpo_margin(x: ObjectiveInputs, beta: float, delta: float, delta_inside: bool) -> torch.Tensor:
    """SimNPO's logsigmoid argument: ``-β·mean_k log p_k − δ``, or ``β·(mean_k nll_k − δ)`` with ``delta_inside``."""
    return -beta * (x.mean(x.logp) + delta) if delta_inside else -beta * x.mean(x.logp) - delta


def _simnpo_weight(x: ObjectiveInputs, beta: float = 2.5, delta: float = 0.0, delta_inside: bool = False):
    return 2.0 * torch.sigmoid(-_simnpo_margin(x, beta, delta, delta_inside))


@objective("simnpo", weight=_simnpo_weight, bounds={"beta": "> 0", "delta": ">= 0"})
def simnpo(x: ObjectiveInputs, beta: float = 2.5, delta: float = 0.0, delta_inside: bool = False) -> torch.Tensor:
    """Simple NPO (reference-free, length-normalised): ℓ = -(2/β)·logsigmoid(-β·mean_k log p_k − δ).

    ``delta_inside``: δ is subtracted from the mean NLL inside β, ℓ = -(2/β)·logsigmoid(β·(mean_k nll_k − δ)),
    as the official SimNPO code and open-unlearning write it (the same as δ_ours = β·δ)."""
    return -(2.0 / beta) * F.logsigmoid(_simnpo_margin(x, beta, delta, delta_inside))


def npo_token_weight(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float, alpha: float = 0.0):
    """TNPO's token weight ``2 p^(β+α) / (p^β + p_o^β)`` (α = 0: TNPO, α > 0: WTNPO), stop-gradient."""
    logp, ref_logp = logp.detach(), ref_logp.detach()
    # 2 p^(β+α) / (p^β + p_o^β) = 2 p^α · σ(β(log p − log p_o)), computed stably
    return 2.0 * torch.exp(alpha * logp) * torch.sigmoid(beta * (logp - ref_logp))


def _tnpo_weight(x: ObjectiveInputs, beta: float = 1.0, pooled: bool = False) -> torch.Tensor:
    return x.mean(npo_token_weight(x.logp, x.ref_logp, beta))


def _wtnpo_weight(x: ObjectiveInputs, alpha: float = 1.5, beta: float = 1.0, pooled: bool = False) -> torch.Tensor:
    return x.mean(npo_token_weight(x.logp, x.ref_logp, beta, alpha))


@objective("tnpo", needs=("ref_logp",), weight=_tnpo_weight, bounds={"beta": "> 0"})
def tnpo(x: ObjectiveInputs, beta: float = 1.0, pooled: bool = False) -> torch.Tensor:
    """Token-wise NPO: ℓ = -mean_k w_k·nll_k, w_k = sg(2p_k^β/(p_k^β+p_o,k^β)) (``pooled``: the token mean over
    the batch, as the paper's code)."""
    return -x.token_mean(npo_token_weight(x.logp, x.ref_logp, beta) * x.nll, pooled=pooled)


@objective("wtnpo", needs=("ref_logp",), weight=_wtnpo_weight, bounds={"alpha": ">= 0", "beta": "> 0"})
def wtnpo(x: ObjectiveInputs, alpha: float = 1.5, beta: float = 1.0, pooled: bool = False) -> torch.Tensor:
    """Weighted token-wise NPO: ℓ = -mean_k w_k·nll_k, w_k = sg(2p_k^(β+α)/(p_k^β+p_o,k^β)) (``pooled``: the
    token mean over the batch, as the paper's code)."""
    return -x.token_mean(npo_token_weight(x.logp, x.ref_logp, beta, alpha) * x.nll, pooled=pooled)


REFUSAL_DRAWS = ("fixed", "per_fetch")


@objective("po", needs=("alt",), bounds={"refusal": "{fixed, per_fetch}", "refusal_seed": ">= 0"})
def po(x: ObjectiveInputs, refusal: str = "fixed", refusal_seed: int = 0, pooled: bool = False) -> torch.Tensor:
    """Preference optimisation towards a refusal: ℓ = mean_k nll_k of a refusal answer to the question
    (``pooled``: the token mean over the batch's refusal tokens, as the paper's code).

    ``refusal`` (read by the engine): ``"fixed"`` pairs each question with one refusal for good (picked by its id);
    ``"per_fetch"`` draws a refusal at random every time a batch is fetched (a seeded generator, ``refusal_seed``),
    as TOFU's and the paper's data loaders do."""
    return -x.token_mean(x.alt_logp, x.alt_mask, pooled=pooled)


def _dpo_margin(x: ObjectiveInputs) -> torch.Tensor:
    refusal = x.sum(x.alt_logp, x.alt_mask) - x.sum(x.ref_alt_logp, x.alt_mask)
    return refusal - (_seq_logp(x) - x.sum(x.ref_logp))


def _dpo_weight(x: ObjectiveInputs, beta: float = 0.1, refusal: str = "fixed", refusal_seed: int = 0):
    return 2.0 * torch.sigmoid(-beta * _dpo_margin(x))


@objective("dpo", needs=("ref_logp", "alt", "ref_alt_logp"), weight=_dpo_weight,
           bounds={"beta": "> 0", "refusal": "{fixed, per_fetch}", "refusal_seed": ">= 0"})
def dpo(x: ObjectiveInputs, beta: float = 0.1, refusal: str = "fixed", refusal_seed: int = 0) -> torch.Tensor:
    """DPO with the refusal preferred over the answer:
    ℓ = -(2/β)·logsigmoid(β·[(log p − log p_o)(refusal) − (log p − log p_o)(answer)]), sequence sums
    (``refusal``, ``refusal_seed``: how the refusal is drawn, as for ``po``)."""
    return -(2.0 / beta) * F.logsigmoid(beta * _dpo_margin(x))


def rmu_direction(dim: int, seed: int, normalize: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """RMU's fixed random vector u ~ U[0,1)^d from a seeded generator (unit norm when ``normalize``)."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if normalize:
        u = u / u.norm()
    return u.to(dtype=dtype, device=device)


HIDDEN_POSITIONS = ("answer", "predicting", "all")


@objective("rmu", needs=("hidden",), bounds={"c": "> 0", "seed": ">= 0", "positions": "{answer, predicting, all}"})
def rmu(x: ObjectiveInputs, layer: int | None = None, c: float = 5.0, seed: int = 0,
        normalize: bool = False, positions: str = "answer", pooled: bool = False) -> torch.Tensor:
    """Representation misdirection: ℓ = mean_k mean_d (h_ℓ,k − c·u)², h_ℓ the hidden state after block
    ``layer`` (default ⌊2L/3⌋) at the answer tokens, u a fixed seeded vector ~U[0,1)^d.

    ``positions`` (read by the engine) picks the hidden states: ``"answer"`` each answer token's own position (as
    open-unlearning), ``"predicting"`` the positions whose outputs predict the answer tokens (one earlier: the last
    prompt token to the second-to-last answer token, as the paper's code), ``"all"`` every position of the
    question and answer (as the original RMU on plain text). ``pooled``: the mean over all of the batch's positions
    (as the paper's code) instead of per sample."""
    u = rmu_direction(x.hidden.shape[-1], seed, normalize, x.hidden.dtype, x.hidden.device)
    return x.token_mean((x.hidden - c * u).pow(2).mean(-1), x.hidden_mask, pooled=pooled)


def _satimp_weight(x: ObjectiveInputs, beta1: float = 5.0, beta2: float = 1.0, pooled: bool = False):
    p = torch.exp(x.logp)
    return x.mean(p.pow(beta1) * (1.0 - p).pow(beta2))


@objective("satimp", weight=_satimp_weight, bounds={"beta1": ">= 0", "beta2": ">= 0"})
def satimp(x: ObjectiveInputs, beta1: float = 5.0, beta2: float = 1.0, pooled: bool = False) -> torch.Tensor:
    """Saturation-importance ascent: ℓ = -mean_k sg(p_k^β1 · (1 − p_k)^β2) · nll_k (``pooled``: over the batch).

    β1 favours tokens the model already finds likely (saturation), β2 those not yet certain (importance)."""
    p = torch.exp(x.logp).detach()
    return -x.token_mean(p.pow(beta1) * (1.0 - p).pow(beta2) * x.nll, pooled=pooled)


@objective("ceu", needs=("full_logp",), bounds={"skip_first": ">= 0"})
def ceu(x: ObjectiveInputs, skip_first: int = 0, pooled: bool = False) -> torch.Tensor:
    """Cross-entropy unlearning: at each answer token, the cross-entropy of the model's next-token distribution
    against sg(its own distribution with the answer token removed), q_v = sg(p_v)/(1 − sg(p_k)) for v ≠ k:
    ℓ = mean_k −Σ_{v≠k} q_v log p_v over the answer tokens after the first ``skip_first``."""
    mask = x.mask * (x.mask.cumsum(-1) > skip_first)
    p_all = x.full_logp.exp().detach()
    p = torch.exp(x.logp).detach()
    live = mask > 0
    rest = torch.where(live, 1.0 - p, torch.ones_like(p))     # Σ_{v≠k} p_v, 1 where no token
    cross = (p_all * x.full_logp).sum(-1) - p * x.logp        # Σ_{v≠k} sg(p_v) log p_v
    per_token = torch.where(live, -cross / rest, torch.zeros_like(p))
    return x.token_mean(per_token, mask, pooled=pooled)


@objective("gd", role="retain")
def gd(x: ObjectiveInputs, pooled: bool = False) -> torch.Tensor:
    """Gradient descent on retain data: ℓ = mean_k nll_k (``pooled``: the token mean over the batch)."""
    return x.token_mean(x.nll, pooled=pooled)


@objective("kl", role="retain", needs=("full_logp", "ref_full_logp"))
def kl(x: ObjectiveInputs, pooled: bool = False) -> torch.Tensor:
    """KL(p_o ‖ p) of the next-token distributions, averaged over the retain sample's answer tokens
    (``pooled``: over the batch's answer tokens)."""
    ref = x.ref_full_logp
    per_token = (ref.exp() * (ref - x.full_logp)).sum(-1)
    return x.token_mean(per_token, pooled=pooled)


@objective("kl_all", role="retain", needs=("all_logp", "ref_all_logp"))
def kl_all(x: ObjectiveInputs) -> torch.Tensor:
    """KL(p_o ‖ p) of the next-token distributions at every position of the padded batch (prompt, answer and
    padding alike), each sample's sum over positions divided by the batch's length: the mean over samples is
    open-unlearning's KL retain loss (a batch mean over every row and position)."""
    ref = x.ref_all_logp
    return (ref.exp() * (ref - x.all_logp)).sum(-1).sum(-1) / ref.shape[1]


@objective("rr", role="retain", needs=("hidden", "ref_hidden"))
def rr(x: ObjectiveInputs, layer: int | None = None, dim_mean: bool = False) -> torch.Tensor:
    """Representation retention: ℓ = mean_k ‖h_ℓ,k − h_ℓ,k^ref‖² over the retain answer tokens
    (``dim_mean``: the squared distance averaged, not summed, over the hidden dimension)."""
    sq = (x.hidden - x.ref_hidden).pow(2)
    return x.mean(sq.mean(-1) if dim_mean else sq.sum(-1), x.hidden_mask)
