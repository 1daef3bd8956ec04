"""What a user sees: the estimated memory of ``gl.g_effect`` against the peak resident memory it adds, measured
in fresh processes with the allocator's default settings (nothing tuned), on this machine's CPU.

    .venv/bin/python benchmarks/memory_measured.py     # prints the rows, writes benchmarks/memory_measured.json

Each row is one fresh process: the model is built, a one-instance call pages in code and lazy initialisations,
freed heap is returned (``malloc_trim``) and the peak resident size is reset (``/proc/self/clear_refs``); then one
``gl.g_effect(..., "npo+gd")`` call with 8 + 8 samples and 16 + 16 targets, and its peak resident size above the
resident size before it (``VmHWM − VmRSS``). ``estimate (tensors)`` is ``estimate_memory``'s ``working`` (live
tensor bytes), ``estimate (resident)`` its ``working_resident`` (with the allocator's overhead on this device):
the second is what ``chunk_size="auto"`` plans with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "memory_measured.json"
# random Llamas with the bundled tokenizer's 1024 tokens (tests/test_memory.py's shapes), and the zoo model
SHAPES = {"llama30m": dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4,
                           intermediate_size=1408),
          "llama120m": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=12,
                            intermediate_size=2304)}
CASES = [("zoo", 16, True), ("zoo", 4, True), ("llama30m", 16, True), ("llama30m", 4, True), ("llama30m", 16, False),
         ("llama30m", 2, True), ("llama120m", 8, True), ("llama120m", 2, False)]


def _model(name: str):
    import geffect_lab as gl

    model, tok = gl.zoo.load("target")
    if name in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(**SHAPES[name], vocab_size=len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg).float().eval()
    return model, tok


def _sets():
    import geffect_lab as gl

    world = gl.load_world()
    return {"forget": world["forget05"][:8], "retain": world["retain95"][:8],
            "targets": {"targeted": world["forget05"][:16], "non_targeted": world["retain_perturbed"][:16]}}


def worker(name: str, chunk: int, per_token: bool) -> dict:
    """One measurement, in this (fresh) process."""
    sys.path.insert(0, str(HERE))
    from _measure import peak_memory_mib

    import geffect_lab as gl
    from geffect_lab.data import encode
    from geffect_lab.memory import estimate_memory

    torch.set_num_threads(1)
    model, tok = _model(name)
    sets = _sets()
    gl.g_effect(model, tok, "npo+gd", forget=sets["forget"][:1], retain=sets["retain"][:1],
                targets={k: v[:1] for k, v in sets["targets"].items()}, chunk_size=1, per_token=per_token)
    seq_len = max(int(encode(tok, g)["attention_mask"].sum(1).max())
                  for g in [sets["forget"], sets["retain"], *sets["targets"].values()])
    plan = estimate_memory(model, 32, seq_len, chunk_size=chunk, n_samples=8, per_token=per_token)
    measured = peak_memory_mib(lambda: gl.g_effect(model, tok, "npo+gd", **sets, chunk_size=chunk,
                                                   per_token=per_token)) * 2**20
    return {"model": name, "chunk": chunk, "per_token": per_token, "measured": measured,
            "tensors": plan["working"], "resident": plan["working_resident"], "stage": plan["peak_stage"]}


def measure(name: str, chunk: int, per_token: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps([name, chunk, per_token])],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["| model | chunk | per_token | measured peak RSS (MiB) | estimate (tensors) | ratio | "
             "estimate (resident) | ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['chunk']} | {r['per_token']} | {r['measured'] / mib:.1f} | "
                     f"{r['tensors'] / mib:.1f} | {r['tensors'] / r['measured']:.2f} | "
                     f"{r['resident'] / mib:.1f} | {r['resident'] / r['measured']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT, help="JSON file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    rows = []
    for case in CASES:
        rows.append(measure(*case))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"written to {args.out}; benchmarks/memory_table.py puts it into benchmarks/memory_estimates.md")


def section() -> str:
    """The measured table and its range, for benchmarks/memory_estimates.md (from the JSON this script wrote)."""
    data = json.loads(OUT.read_text())
    rows = data["rows"]
    resident = [r["resident"] / r["measured"] for r in rows]
    tensors = [r["tensors"] / r["measured"] for r in rows]
    return "\n".join([
        "## Measured on the CPU: the estimate against what a process takes",
        "",
        " ".join(__doc__.split("\n\n")[2].split()),
        f"Measured by `.venv/bin/python benchmarks/memory_measured.py` (torch {data['torch']}, one thread, glibc's "
        "default malloc), written to `benchmarks/memory_measured.json`.",
        "",
        table(rows),
        "",
        f"Over these {len(rows)} processes the live-tensor estimate is {min(tensors):.2f}–{max(tensors):.2f}× the "
        f"peak resident memory, the resident estimate {min(resident):.2f}–{max(resident):.2f}× (target: within "
        "±25 %). `chunk_size=\"auto\"` plans the resident estimate against 80 % of the free memory "
        "(`geffect_lab.memory.BUDGET_FRACTION`).",
        ""])


if __name__ == "__main__":
    main()
