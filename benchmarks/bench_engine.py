"""Speed and memory of the G-effect engines against a plain forward+backward, side by side in one run.

    python benchmarks/bench_engine.py                 # zoo target and a ~30M-parameter random Llama, CPU
    python benchmarks/bench_engine.py --device cuda --large   # adds a ~1B-parameter random Llama on a GPU

For each model, on 64 target instances (32 targeted from forget05, 32 non-targeted from the retain split),
with the objective's forget batch of 16 forget05 instances:

- ``plain f+b``: one batched forward and backward of the mean risk over the 64 instances (parameter
  gradients), the cost the paper's batch-level G-effect needs for its risk gradient;
- ``fast (layers)``: ``gl.g_effect`` with the per instance × layer × term G-effects only, the objective's
  gradient included;
- ``+ built-in check``: the same with ``verify="first"`` (the default of a measurement's first call): one more
  plain backward over the targets, whose per-layer totals the fast engine's must match;
- ``fast (all)``: the same plus per-token G-effects and the per-sample PG-effect and sample effect;
- ``reference``: the per-instance autograd loop (per instance × layer × term, the oracle).

Prints times and peak memory as ratios to ``plain f+b``; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import peak_memory_mib, wall_time  # noqa: E402

import geffect_lab as gl  # noqa: E402
from geffect_lab._batching import trim  # noqa: E402
from geffect_lab.engine.forward import risk_and_tokens  # noqa: E402


def random_llama(vocab: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                 dtype=torch.float32, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      attn_implementation="eager")
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def plain_forward_backward(model, batch):
    model.zero_grad(set_to_none=True)
    risk, _, _ = risk_and_tokens(model, trim(batch))
    risk.mean().backward()
    model.zero_grad(set_to_none=True)


def bench(name, model, tok, world, objective, repeats, device, chunk_size, reference=True):
    targets = {"targeted": world["forget05"][:32], "non_targeted": world["retain90"][-32:]}
    forget = world["forget05"][:16]
    batch = {k: v.to(device) for k, v in gl.encode(tok, targets["targeted"] + targets["non_targeted"]).items()}
    common = dict(objective=objective, forget=forget, targets=targets, retain=world["retain90"][:16],
                  chunk_size=chunk_size, verify="never")
    runs = {
        "plain f+b": lambda: plain_forward_backward(model, batch),
        "fast (layers)": lambda: gl.g_effect(model, tok, per_token=False, pg=False, **common),
        # a measurement's first call also checks itself against one plain backward (verify="first")
        "+ built-in check": lambda: gl.g_effect(model, tok, per_token=False, pg=False, **{**common,
                                                                                          "verify": "first"}),
        "fast (all)": lambda: gl.g_effect(model, tok, **common),
    }
    if reference:
        runs["reference"] = lambda: gl.g_effect(model, tok, engine="reference", per_token=False, pg=False,
                                                **common)
    times = {k: wall_time(f, repeats, device) for k, f in runs.items()}
    memory = {k: peak_memory_mib(f, device) for k, f in runs.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {params / 1e6:.1f} M parameters, {objective}, 64 instances, chunk {chunk_size}")
    print(f"{'':16s} {'time':>10s} {'× plain':>8s} {'memory':>10s} {'× plain':>8s}")
    for k in runs:
        print(f"{k:16s} {times[k]:9.3f}s {times[k] / times['plain f+b']:8.2f} {memory[k]:8.1f}MiB "
              f"{memory[k] / memory['plain f+b']:8.2f}")
    if reference:
        print(f"fast (layers) is {times['reference'] / times['fast (layers)']:.1f}× faster than the reference loop")
    return times, memory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--objective", default="npo")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--large", action="store_true", help="also a ~1B-parameter Llama (GPU)")
    parser.add_argument("--only", choices=["zoo", "30m", "1b"], default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    world = gl.load_world()
    model, tok = gl.zoo.load("target", device=args.device)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    if args.only in (None, "zoo"):
        bench("zoo target", model, tok, world, args.objective, args.repeats, args.device, args.chunk_size)
    if args.only in (None, "30m"):
        big = random_llama(len(tok), 512, 10, 1408, 8, 4, device=args.device)
        bench("random Llama", big, tok, world, args.objective, args.repeats, args.device, args.chunk_size)
    if args.large or args.only == "1b":
        huge = random_llama(len(tok), 2048, 16, 5632, 16, 8, dtype=torch.bfloat16, device=args.device)
        bench("random Llama 1B", huge, tok, world, args.objective, args.repeats, args.device, args.chunk_size)


if __name__ == "__main__":
    main()
