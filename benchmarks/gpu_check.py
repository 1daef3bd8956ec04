"""One short, prepared check for a GPU machine: exactness, speed ratios and memory against the estimate.

    python benchmarks/gpu_check.py                        # CUDA, a ~1.1 B random Llama in bfloat16 (<= 8 min)
    python benchmarks/gpu_check.py --device cpu --small   # the same steps on a tiny model (CI runs this)

Writes JSON (``--out``, default ``benchmarks/gpu_check.json``) with:

- ``exactness``: the fast engine in float32 against the per-instance oracle in float64 on the same weights
  (per layer x term, per token, PG-effect: relative errors), and bfloat16 fast against the same float64 oracle;
- ``speed``: wall time of ``fast (layers)``, ``fast (all)`` (per token + PG-effect) and the reference loop, each
  as a ratio to one plain batched forward+backward of the mean risk over the same targets, measured side by side;
- ``memory``: peak memory of ``fast (all)`` (``torch.cuda.max_memory_allocated`` above what was in use; on the
  CPU the resident-set peak) beside ``gl.estimate_memory`` for the same call.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import peak_memory_mib, wall_time  # noqa: E402

import geffect_lab as gl  # noqa: E402
from geffect_lab._batching import trim  # noqa: E402
from geffect_lab.engine.forward import risk_and_tokens  # noqa: E402
from geffect_lab.testing import relative_error  # noqa: E402

# a ~1.1 B Llama (TinyLlama's shapes) and a tiny one
SHAPES = {"large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000),
          "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=None)}


def random_llama(shape: dict, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**shape, "vocab_size": shape["vocab_size"] or vocab}, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def exactness(model64, tok, sets, dtype) -> dict:
    """The fast engine at ``dtype`` against the float64 oracle on the same weights."""
    args = dict(forget=sets["forget"], retain=sets["retain"], targets=sets["few"], chunk_size=4)
    ref = gl.g_effect(model64, tok, "npo+gd", engine="reference", **args)
    low = _copy(model64, dtype)
    fast = gl.g_effect(low, tok, "npo+gd", **args)
    del low
    return {k: relative_error(fast[k], ref[k]) for k in ("g_effect", "g_effect_token", "pg_effect", "sample_effect")}


def _copy(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def speed(model, tok, sets, device: str, repeats: int, reference: bool) -> dict:
    targets = sets["targets"]
    batch = {k: v.to(device) for k, v in gl.encode(tok, targets["targeted"] + targets["non_targeted"]).items()}
    args = dict(forget=sets["forget"], retain=sets["retain"], targets=targets, chunk_size=16, verify="never")

    def plain():
        model.zero_grad(set_to_none=True)
        risk, _, _ = risk_and_tokens(model, trim(batch))
        risk.mean().backward()
        model.zero_grad(set_to_none=True)

    calls = {"plain f+b": plain,
             "fast (layers)": lambda: gl.g_effect(model, tok, "npo+gd", per_token=False, pg=False, **args),
             "fast (all)": lambda: gl.g_effect(model, tok, "npo+gd", **args)}
    if reference:
        calls["reference"] = lambda: gl.g_effect(model, tok, "npo+gd", engine="reference", per_token=False,
                                                 pg=False, **args)
    seconds = {name: wall_time(fn, repeats=repeats if name != "reference" else 1, device=device)
               for name, fn in calls.items()}
    verify = wall_time(lambda: gl.g_effect(model, tok, "npo+gd", per_token=False, pg=False,
                                           **{**args, "verify": "first"}), repeats=repeats, device=device)
    seconds["fast (layers) + built-in check"] = verify
    base = seconds["plain f+b"]
    return {"seconds": seconds, "ratio_to_plain": {k: v / base for k, v in seconds.items()}}


def memory(model, tok, sets, device: str) -> dict:
    targets = sets["targets"]
    n = len(targets["targeted"]) + len(targets["non_targeted"])
    seq_len = int(gl.encode(tok, targets["targeted"] + targets["non_targeted"])["attention_mask"].sum(1).max())
    measured = peak_memory_mib(lambda: gl.g_effect(model, tok, "npo+gd", forget=sets["forget"],
                                                   retain=sets["retain"], targets=targets, chunk_size=16,
                                                   verify="never"), device=device)
    est = gl.estimate_memory(model, n, seq_len, per_token=True, pg=True, n_terms=2, chunk_size=16,
                             n_samples=len(sets["forget"]), verify=False)
    # what the allocator holds (reserved on a GPU, resident on the CPU) against the resident estimate
    held = peak_memory_mib(lambda: gl.g_effect(model, tok, "npo+gd", forget=sets["forget"], retain=sets["retain"],
                                               targets=targets, chunk_size=16, verify="never"),
                           device=device, reserved=True)
    mib = {k: v / 2**20 for k, v in est.items() if isinstance(v, (int, float)) and k != "chunk_size"}
    return {"measured_mib": measured, "estimated_mib": mib["working"], "ratio": mib["working"] / measured,
            "reserved_mib": held, "estimated_resident_mib": mib["working_resident"],
            "resident_ratio": mib["working_resident"] / held,
            "estimate_mib": mib, "peak_stage": est.get("peak_stage"), "instances": n, "seq_len": seq_len}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a tiny model: checks that the script runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).with_name("gpu_check.json")))
    args = ap.parse_args(argv)
    device = str(gl._batching.check_device(args.device))
    start = time.perf_counter()
    world = gl.load_world()
    _, tok = gl.zoo.load("target")
    shape = SHAPES["small" if args.small else "large"]
    size = 4 if args.small else 16
    sets = {"forget": world["forget05"][:size], "retain": world["retain95"][:size],
            "targets": {"targeted": world["forget05"][:2 * size], "non_targeted": world["retain90"][-2 * size:]},
            "few": {"targeted": world["forget05"][:2], "non_targeted": world["retain90"][-2:]}}
    report = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
              "torch": torch.__version__, "model": {**shape, "vocab_size": shape["vocab_size"] or len(tok)}}
    model64 = random_llama(shape, len(tok), torch.float64, device)
    report["parameters"] = sum(p.numel() for p in model64.parameters())
    report["exactness"] = {"float32 fast vs float64 oracle": exactness(model64, tok, sets, torch.float32),
                           "bfloat16 fast vs float64 oracle": exactness(model64, tok, sets, torch.bfloat16)}
    del model64
    model = random_llama(shape, len(tok), torch.bfloat16, device)
    report["speed (bfloat16)"] = speed(model, tok, sets, device, args.repeats, reference=True)
    report["memory (bfloat16)"] = memory(model, tok, sets, device)
    report["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
