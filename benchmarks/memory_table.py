"""Estimated memory of ``gl.g_effect`` for published Llama shapes, and the chunk size for an 80 GB GPU.

These are *estimates* from :mod:`geffect_lab.memory` (shapes only: each model is built on the meta device from a
config written out by hand, nothing is downloaded and no weight is allocated), not measurements.

    .venv/bin/python benchmarks/memory_table.py          # prints the table and writes benchmarks/memory_estimates.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from geffect_lab.memory import auto_chunk_size, estimate_memory

# published shapes (the models' config.json files)
MODELS = {
    "Llama-3.2-1B": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "Llama-2-7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000),
    "Llama-3-8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256),
}
# (per_token, pg, verify): the default call first, then what can be switched off
SETTINGS = [(True, True, True), (True, False, False), (False, False, False)]
N_INSTANCES, SEQ_LEN, N_TERMS = 64, 256, 2  # 32 targeted + 32 non-targeted, objective "npo+gd"
SAMPLES = (32, 8)  # forget (and retain) samples per term: they go through the model unchunked
BUDGET = 0.8 * 80e9
OUT = Path(__file__).with_name("memory_estimates.md")


def gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def row(name: str, cfg, samples: int, per_token: bool, pg: bool, verify: bool) -> str:
    kwargs = dict(per_token=per_token, pg=pg, n_terms=N_TERMS, verify=verify, n_samples=samples)
    try:
        chunk = auto_chunk_size(cfg, N_INSTANCES, SEQ_LEN, budget_bytes=BUDGET, dtype=torch.bfloat16, device="cuda",
                                **kwargs)
    except ValueError:
        chunk = None
    plan = estimate_memory(cfg, N_INSTANCES, SEQ_LEN, torch.bfloat16, chunk_size=chunk or 1, device="cuda", **kwargs)
    flags = f"{samples} | {per_token!s:5} | {pg!s:5} | {verify!s:5}"
    picked = str(chunk) if chunk else "does not fit (at chunk 1)"
    return (f"| {name} | {flags} | {gb(plan['weights'])} | {gb(plan['objective_gradients'])} | "
            f"{gb(plan['risk_gradients'])} | {gb(plan['activations'])} | {gb(plan['peak'])} | "
            f"{gb(plan['peak_resident'])} | {plan['peak_stage']} | "
            f"{picked} |")


def table() -> str:
    from transformers import LlamaConfig

    lines = [
        "# Estimated memory of `gl.g_effect` (estimates, not measurements)",
        "",
        f"From `geffect_lab.memory.estimate_memory` / `auto_chunk_size` on configs built by hand from the published "
        f"shapes (meta device: nothing downloaded, no weight allocated). bfloat16, objective `npo+gd` ({N_TERMS} "
        f"terms), {N_INSTANCES // 2} + {N_INSTANCES // 2} target instances, `samples` forget (and retain) samples "
        f"per term, seq_len {SEQ_LEN}, budget 0.8 × 80 GB = {gb(BUDGET)} GB. GB = 10⁹ bytes. `activations`: one "
        "target chunk's pass at the chunk picked; `peak`: weights included, at that chunk (at chunk 1 when nothing "
        "fits). `peak reserved`: with the GPU allocator's overhead as `estimate_memory` models it "
        "(`ALLOCATOR_SLACK`; not measured on this project's machines), what the chunk is picked by. `verify`: the "
        "engine's built-in check on a measurement's first call (`verify=\"first\"`, the default). Regenerate with "
        "`.venv/bin/python benchmarks/memory_table.py`.",
        "",
        "| model | samples | per_token | pg | verify | weights | objective grads | risk grads | activations | "
        "peak | peak reserved | peak stage | chunk_size for 80 GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shapes in MODELS.items():
        cfg = LlamaConfig(**shapes)
        lines += [row(name, cfg, samples, *setting) for samples in SAMPLES for setting in SETTINGS]
    from memory_measured import section

    return "\n".join(lines) + "\n\n" + section()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="markdown file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = table()
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
