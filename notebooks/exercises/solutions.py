"""Solutions to notebooks/exercises/08_exercises.ipynb — try the exercises first.

Not a module to import: each ``# %% exercise-N`` block below is the finished version of the notebook cell with
the same id (the cell tagged ``exercise``), and runs in the notebook's namespace (``gl``, ``torch``, ``F``,
``answer_nll``, … come from the notebook's first cells). To see a solution at work, paste its block over the
stub and run the check under it. tests/test_exercises.py runs the notebook with every stub replaced by its
block, and checks that every check passes; and as shipped, and checks that every check fails on its stub.
"""

# %% exercise-1
def g_effect_by_hand(model, tok, forget, target):
    """The G-effect of GA on `forget`, measured on the single instance `target`, by plain autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    risk = answer_nll(model, gl.encode(tok, [target]))[0]
    loss = -answer_nll(model, gl.encode(tok, forget)).mean()
    grad_risk = torch.autograd.grad(risk, params)
    grad_loss = torch.autograd.grad(loss, params)
    return float(sum((a * b).sum() for a, b in zip(grad_risk, grad_loss)))


# %% exercise-2
@gl.objective("my_npo", needs=("ref_logp",), overwrite=True)
def my_npo(x, beta: float = 0.1):
    """NPO: ℓ_j = -(2/β)·logsigmoid(-β·(Σ_k log p_jk − Σ_k log p_o,jk)), one value per sample."""
    log_ratio = x.sum(x.logp) - x.sum(x.ref_logp)      # sequence log-probability, model minus reference
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio)


# %% exercise-3
def predicted_risk_change(ds, lr):
    """First-order prediction of each instance's risk change for one SGD step of size lr: -lr · e_i."""
    return -lr * ds.g_effect.isel(step=0).sum(["layer", "term"])


def sgd_step_(model, tok, forget, lr):
    """One plain SGD step of gradient ascent on `forget`, in place: θ ← θ − lr·∇L_GA(θ)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = -answer_nll(model, gl.encode(tok, forget)).mean()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g


# %% exercise-4
def carrying_layer(ds):
    """The layer group carrying the most unlearning G-effect: the most *negative* targeted mean (ΔR ≈ -lr·e)."""
    per_layer = ds.g_effect.isel(step=0).sum("term").where(ds.split == "targeted", drop=True).mean("instance")
    return str(per_layer.idxmin("layer").item())


def train_only(model, layer):
    """Freeze every parameter of `model` outside the layer group `layer`; in place."""
    groups = gl.layer_groups(model)
    for _, p in groups.params(model):
        p.requires_grad_(groups.names[groups.group_of(p)] == layer)
