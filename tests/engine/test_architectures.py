"""Every causal LM that transformers can build offline on this CPU: the fast engine equals the per-instance oracle
(per layer x term, per token, PG-effect), or the engine refuses the model up front with an error naming a module
type — never a wrong number. Writes the coverage table ``docs/architectures.md``.

Each architecture is built from its own default config, shrunk (:func:`geffect_lab.testing.tiny_causal_lm`), in
float64 with eager attention and eager experts, and measured on NPO+GD (a forget term with a reference model and
a retain term) by :func:`geffect_lab.testing.architecture_outcome`, two architectures at a time in worker
processes of one thread each.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from geffect_lab.testing import architecture_outcome

pytestmark = pytest.mark.slow

TABLE = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"
MUST_BE_EXACT = ("llama", "gemma", "gemma2", "gemma3_text", "falcon", "opt", "gpt2", "mistral", "qwen2", "phi")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "deepseek_v3", "jetmoe")


def _model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _one_thread():
    import warnings

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import transformers.utils.logging as hf_logging

    hf_logging.set_verbosity_error()


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict]:
    types = _model_types()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx, initializer=_one_thread) as pool:
        got = {o["model_type"]: o for o in pool.map(architecture_outcome, types, chunksize=4)}
    _write_table([got[t] for t in types])
    return got


@pytest.mark.parametrize("model_type", _model_types())
def test_exact_or_refused_by_name(model_type, outcomes):
    got = outcomes[model_type]
    assert got["status"] != "WRONG", f"{model_type}: silently wrong G-effects, relative errors {got['errors']}"
    assert got["status"] != "CRASH", f"{model_type}: the engine failed without a refusal by name: {got['detail']}"


def test_coverage_goals(outcomes):
    built = [o for o in outcomes.values() if o["status"] != "not instantiable"]
    exact = [o for o in built if o["status"] == "exact"]
    assert len(exact) >= 0.9 * len(built), f"{len(exact)} of {len(built)} instantiable architectures exact"
    assert all(outcomes[m]["status"] == "exact" for m in MUST_BE_EXACT), \
        {m: outcomes[m]["status"] for m in MUST_BE_EXACT}
    assert sum(outcomes[m]["status"] == "exact" for m in MOE_FAMILIES if m in outcomes) >= 2


def _write_table(outcomes: list[dict]) -> None:
    import transformers

    built = [o for o in outcomes if o["status"] != "not instantiable"]
    exact = [o for o in built if o["status"] == "exact"]
    refused = [o for o in built if o["status"] == "refused"]
    lines = [
        "# Architectures: exact, or refused by name",
        "",
        "Written by `tests/engine/test_architectures.py` (re-run it to refresh this page) with transformers "
        f"{transformers.__version__} and torch {torch.__version__.split('+')[0]}. Every key of transformers' "
        "causal-LM auto mapping is built from its default config, shrunk to 2 layers of width 32 (fewer overrides "
        "where the architecture ties its sizes together), in float64 with eager attention and eager experts, and "
        "measured with NPO+GD by the fast engine (its built-in check on) and by the per-instance autograd oracle. "
        "*exact*: per layer x term, per token and PG-effect within 1e-9 relative, or 1e-6 where the model runs some "
        "ops below float64 (HF computes norms, softmaxes and routers in float32 even in a float64 model; the "
        "`tol` column); *refused*: the engine raised an error naming the module type before returning any number; "
        "*not instantiable*: the architecture could not be built small and run offline on this CPU (the reason "
        "is given).",
        "",
        f"**{len(exact)} of {len(built)} instantiable architectures exact "
        f"({100 * len(exact) / max(len(built), 1):.0f} %), {len(refused)} refused by name, "
        f"{len(built) - len(exact) - len(refused)} wrong or crashed; {len(outcomes) - len(built)} of "
        f"{len(outcomes)} not instantiable.**",
        "",
        "| model type | outcome | parameters | g_effect | pg_effect | g_effect_token | tol | why |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for o in outcomes:
        e = o.get("errors") or {}
        cells = [f"{e[k]:.1e}" if k in e else "" for k in ("g_effect", "pg_effect", "g_effect_token")]
        tol = f"{o['tolerance']:g}" if o.get("tolerance") else ""
        why = " ".join(o["detail"].split()).replace("|", "\\|")
        if len(why) > 300:
            why = why[:297] + "..."
        lines.append(f"| `{o['model_type']}` | {o['status']} | {o['parameters'] or ''} | {' | '.join(cells)} | "
                     f"{tol} | {why} |")
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text("\n".join(lines) + "\n")
