"""Every built-in objective: its value on a hand-computed case and its gradient (finite differences, or the
documented weights where the objective stops gradients)."""

from __future__ import annotations

import math

import pytest
import torch

import geffect_lab as gl
from geffect_lab.objectives import ObjectiveInputs


def T(values):
    return torch.tensor(values, dtype=torch.float64)


# two samples: 3 and 2 answer tokens (the third position of sample 1 is padding)
P = [[0.5, 0.25, 0.8], [0.9, 0.6, 1.0]]
PO = [[0.4, 0.5, 0.7], [0.9, 0.3, 1.0]]
MASK = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _inputs(**extra) -> ObjectiveInputs:
    logp = torch.log(T(P)) * MASK
    ref = torch.log(T(PO)) * MASK
    return ObjectiveInputs(logp=logp.clone().requires_grad_(True), mask=MASK, ids=["s0", "s1"], ref_logp=ref,
                           **extra)


def _tokens(j):
    return [P[j][k] for k in range(int(MASK[j].sum()))], [PO[j][k] for k in range(int(MASK[j].sum()))]


def _fd_check(spec, x: ObjectiveInputs, field: str = "logp", **params):
    """Autograd gradient of Σ_j ℓ_j with respect to ``field`` against central finite differences."""
    base = getattr(x, field)
    loss = spec(x, **params).sum()
    (grad,) = torch.autograd.grad(loss, base)
    eps = 1e-6
    fd = torch.zeros_like(base)
    flat = base.detach().reshape(-1)
    for i in range(flat.numel()):
        for sign in (1, -1):
            bumped = flat.clone()
            bumped[i] += sign * eps
            y = x.__class__(**{**x.__dict__, field: bumped.reshape(base.shape)})
            fd.view(-1)[i] += sign * float(spec(y, **params).sum().detach()) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    return grad


def test_ga_value_and_gradient():
    x = _inputs()
    expected = [sum(math.log(p) for p in _tokens(j)[0]) / len(_tokens(j)[0]) for j in range(2)]
    torch.testing.assert_close(gl.objectives.ga(x), T(expected))
    grad = _fd_check(gl.objectives.ga, x)
    torch.testing.assert_close(grad, MASK / MASK.sum(1, keepdim=True))  # dℓ/dlog p_k = 1/K


def test_gd_is_the_negative_of_ga():
    x = _inputs()
    torch.testing.assert_close(gl.objectives.gd(x), -gl.objectives.ga(x))
    _fd_check(gl.objectives.gd, x)


def test_npo_value_and_its_weight():
    beta = 0.7
    x = _inputs()
    for j, value in enumerate(gl.objectives.npo(x, beta=beta)):
        p, po = _tokens(j)
        s, so = sum(map(math.log, p)), sum(map(math.log, po))
        expected = -(2 / beta) * math.log(1 / (1 + math.exp(beta * (s - so))))
        assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    grad = _fd_check(gl.objectives.npo, x, beta=beta)
    for j in range(2):  # ∇ℓ = w · ∇Σ_k log p_k, w = 2 p^β / (p^β + p_o^β), p = Π_k p_k
        p, po = math.prod(_tokens(j)[0]), math.prod(_tokens(j)[1])
        w = 2 * p**beta / (p**beta + po**beta)
        torch.testing.assert_close(grad[j], w * MASK[j])


def test_npo_weight_is_one_at_the_reference():
    x = _inputs()
    x.ref_logp = x.logp.detach().clone()
    (grad,) = torch.autograd.grad(gl.objectives.npo(x, beta=0.1).sum(), x.logp)
    torch.testing.assert_close(grad, MASK)


def test_simnpo_value_and_gradient():
    beta, delta = 2.5, 0.3
    x = _inputs()
    for j, value in enumerate(gl.objectives.simnpo(x, beta=beta, delta=delta)):
        p, _ = _tokens(j)
        m = sum(map(math.log, p)) / len(p)
        expected = -(2 / beta) * math.log(1 / (1 + math.exp(beta * m + delta)))
        assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    _fd_check(gl.objectives.simnpo, x, beta=beta, delta=delta)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_wga_value_and_stop_gradient_weight(alpha):
    x = _inputs()
    for j, value in enumerate(gl.objectives.wga(x, alpha=alpha)):
        p, _ = _tokens(j)
        expected = sum(pk**alpha * math.log(pk) for pk in p) / len(p)
        assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(gl.objectives.wga(x, alpha=alpha).sum(), x.logp)
    expected = T(P) ** alpha * MASK / MASK.sum(1, keepdim=True)  # sg(p_k)^α / K
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("name,alpha", [("tnpo", 0.0), ("wtnpo", 1.5)])
def test_tnpo_and_wtnpo_token_weights(name, alpha):
    beta = 1.0
    x = _inputs()
    params = {"beta": beta} if name == "tnpo" else {"beta": beta, "alpha": alpha}
    spec = gl.get_objective(name)
    weights = [[2 * p**(beta + alpha) / (p**beta + po**beta) for p, po in zip(*_tokens(j))] for j in range(2)]
    for j, value in enumerate(spec(x, **params)):
        p, _ = _tokens(j)
        expected = sum(w * math.log(pk) for w, pk in zip(weights[j], p)) / len(p)
        assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(spec(x, **params).sum(), x.logp)
    for j in range(2):
        k = len(weights[j])
        torch.testing.assert_close(grad[j, :k], T(weights[j]) / k)  # w_k / K, weights stop-gradient


def test_po_is_the_refusal_nll():
    alt = torch.log(T([[0.3, 0.6], [0.2, 0.5]])).requires_grad_(True)
    alt_mask = T([[1.0, 1.0], [1.0, 0.0]])
    x = _inputs(alt_logp=alt, alt_mask=alt_mask)
    torch.testing.assert_close(gl.objectives.po(x), T([-(math.log(0.3) + math.log(0.6)) / 2,
                                                                  -math.log(0.2)]))
    _fd_check(gl.objectives.po, x, field="alt_logp")


def test_dpo_value_and_gradients():
    beta = 0.1
    alt = torch.log(T([[0.3, 0.6], [0.2, 0.5]]))
    ref_alt = torch.log(T([[0.1, 0.5], [0.4, 0.5]]))
    alt_mask = T([[1.0, 1.0], [1.0, 0.0]])
    x = _inputs(alt_logp=(alt * alt_mask).requires_grad_(True), alt_mask=alt_mask, ref_alt_logp=ref_alt * alt_mask)
    for j, value in enumerate(gl.objectives.dpo(x, beta=beta)):
        k = int(alt_mask[j].sum())
        refusal = float((alt[j, :k] - ref_alt[j, :k]).sum())
        p, po = _tokens(j)
        answer = sum(map(math.log, p)) - sum(map(math.log, po))
        expected = -(2 / beta) * math.log(1 / (1 + math.exp(-beta * (refusal - answer))))
        assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    _fd_check(gl.objectives.dpo, x, beta=beta)
    _fd_check(gl.objectives.dpo, x, field="alt_logp", beta=beta)


@pytest.mark.parametrize("normalize", [False, True])
def test_rmu_value_and_gradient(normalize):
    torch.manual_seed(0)
    hidden = torch.randn(size=(2, 3, 4), dtype=torch.float64).requires_grad_(True)
    x = _inputs(hidden=hidden, hidden_mask=MASK)
    c = 5.0
    u = torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = u / u.norm() if normalize else u
    for j, value in enumerate(gl.objectives.rmu(x, layer=0, c=c, normalize=normalize)):
        k = int(MASK[j].sum())
        expected = float(((hidden[j, :k] - c * u) ** 2).mean().detach())
        assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    _fd_check(gl.objectives.rmu, x, field="hidden", layer=0, c=c, normalize=normalize)


def test_kl_value_and_gradient():
    torch.manual_seed(1)
    full = torch.log_softmax(torch.randn(size=(2, 3, 5), dtype=torch.float64), -1).requires_grad_(True)
    ref = torch.log_softmax(torch.randn(size=(2, 3, 5), dtype=torch.float64), -1)
    x = _inputs(full_logp=full, ref_full_logp=ref)
    for j, value in enumerate(gl.objectives.kl(x)):
        k = int(MASK[j].sum())
        expected = sum(float((ref[j, t].exp() * (ref[j, t] - full[j, t])).sum().detach()) for t in range(k)) / k
        assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    _fd_check(gl.objectives.kl, x, field="full_logp")
    x.full_logp = ref.clone().requires_grad_(True)
    torch.testing.assert_close(gl.objectives.kl(x), torch.zeros(2, dtype=torch.float64))  # zero at the reference


def test_rr_value_and_gradient():
    torch.manual_seed(2)
    hidden = torch.randn(size=(2, 3, 4), dtype=torch.float64).requires_grad_(True)
    ref = torch.randn(size=(2, 3, 4), dtype=torch.float64)
    x = _inputs(hidden=hidden, hidden_mask=MASK, ref_hidden=ref)
    for j, value in enumerate(gl.objectives.rr(x, layer=0)):
        k = int(MASK[j].sum())
        expected = float(((hidden[j, :k] - ref[j, :k]) ** 2).sum(-1).mean().detach())
        assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    _fd_check(gl.objectives.rr, x, field="hidden", layer=0)
