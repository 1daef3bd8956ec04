"""geffect_lab.memory: the estimate from shapes, held to peaks measured in a fresh process, and the chunk size
it picks for a budget.

Run as a script (``python tests/test_memory.py '{"model": "zoo", "chunk": 16}'``) this file is the measuring
worker: it prints the peak memory one ``gl.g_effect`` call adds, as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import geffect_lab as gl
from geffect_lab.memory import auto_chunk_size, estimate_memory

TOLERANCE = 0.30  # live tensors: |estimate - measured| <= 30 % of the measured increment
RESIDENT_TOLERANCE = 0.25  # what a user sees: |resident estimate - peak resident| <= 25 % of the peak resident
# glibc returns freed blocks above this size to the system at once. By default its threshold grows up to 32 MiB
# as blocks are freed, and freed activations then stay resident in its heap, so that the resident size measures
# the allocator's slack as much as the engine (1.6x the live tensors on the 30 M model). Fixing the threshold
# makes the resident size follow the live tensors (to ~2 % of the profiler's count), which is what ``working``
# models; ``working_resident`` adds the default allocator's slack and is held to processes that keep it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident size from /proc")


# random Llamas with the bundled tokenizer's 1024 tokens: the engine benchmark's 30.6 M model, and ~123 M
SHAPES = {"llama30m": dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4,
                           intermediate_size=1408),
          "llama120m": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=12,
                            intermediate_size=2304)}


def llama_config(name: str, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[name], vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def measured_sets(world) -> dict:
    return {"forget": world["forget05"][:8], "retain": world["retain95"][:8],
            "targets": {"targeted": world["forget05"][:16], "non_targeted": world["retain_perturbed"][:16]}}


def longest_row(tokenizer, sets) -> int:
    from geffect_lab.data import encode

    groups = [sets["forget"], sets["retain"], *sets["targets"].values()]
    return max(int(encode(tokenizer, g)["attention_mask"].sum(1).max()) for g in groups)


# ------------------------------------------------------------------------------------------ (a) config = model
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_config_and_model_give_the_same_estimate(arch):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if arch == "llama":
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=160, vocab_size=300)
    else:  # tied input and output embeddings: one parameter, counted once
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    for kwargs in ({}, {"per_token": False, "pg": False, "chunk_size": 3}, {"dtype": torch.bfloat16, "n_terms": 1}):
        from_config = estimate_memory(cfg, 10, 40, **kwargs)
        assert from_config == estimate_memory(model, 10, 40, **kwargs)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert from_config["weights"] == 2 * params  # bfloat16


def test_estimate_from_a_7b_config_allocates_nothing():
    """A Llama-2-7B config is built on the meta device: the weights' bytes match its published 6.74 B
    parameters in bfloat16 without ever holding them."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000)
    plan = estimate_memory(cfg, 64, 256, dtype=torch.bfloat16, chunk_size=4)
    assert plan["weights"] == 2 * 6_738_415_616
    assert plan["peak"] == plan["weights"] + plan["working"] == plan["weights"] + max(plan["stages"].values())
    assert plan["chunk_size"] == 4 and plan["objective_gradients"] == 2 * plan["weights"]


# ------------------------------------------------------------------------------------------ (b) measured
def measure(model: str, chunk: int, allocator: str = "fixed") -> dict:
    """The peak a ``gl.g_effect(..., "npo+gd")`` call adds, measured in a fresh process (see the worker), with
    glibc's mmap threshold fixed (the resident size follows the live tensors) or as it comes (``"default"``: what
    a user's process takes)."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if allocator == "fixed":
        env.update(MALLOC_ENV)
    out = subprocess.run([sys.executable, __file__, json.dumps({"model": model, "chunk": chunk})], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_estimate(model_or_config, tokenizer, world, name: str, chunk: int, allocator: str = "fixed"):
    """The live-tensor estimate against a fixed-threshold process; the resident one against a default one."""
    sets = measured_sets(world)
    seq_len = longest_row(tokenizer, sets)
    plan = estimate_memory(model_or_config, 32, seq_len, chunk_size=chunk, n_samples=len(sets["forget"]),
                           device="cpu")
    got = measure(name, chunk, allocator)["increment"]
    key, tolerance = ("working", TOLERANCE) if allocator == "fixed" else ("working_resident", RESIDENT_TOLERANCE)
    ratio = plan[key] / got
    print(f"{name} chunk {chunk} ({allocator} allocator): measured {got / 2**20:.1f} MiB, estimated "
          f"{plan[key] / 2**20:.1f} MiB ({ratio:.2f}x, stage {plan['peak_stage']!r})")
    assert abs(ratio - 1) <= tolerance, (name, chunk, got, plan)


@linux_only
@pytest.mark.parametrize("chunk", [16, 4])
def test_estimate_matches_measured_peak_zoo(target, world, chunk):
    model, tok = target
    check_estimate(model, tok, world, "zoo", chunk)


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("name,chunk", [("llama30m", 16), ("llama30m", 4), ("llama120m", 8)])
def test_estimate_matches_measured_peak_random_llamas(tokenizer, world, name, chunk):
    check_estimate(llama_config(name, len(tokenizer)), tokenizer, world, name, chunk)


@linux_only
@pytest.mark.parametrize("chunk", [16, 4])
def test_resident_estimate_matches_what_a_process_takes_zoo(target, world, chunk):
    """With glibc as it comes, the process keeps 1.4-1.6x the live tensors; the resident estimate models it."""
    model, tok = target
    check_estimate(model, tok, world, "zoo", chunk, allocator="default")


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("name,chunk", [("llama30m", 16), ("llama30m", 2), ("llama120m", 8)])
def test_resident_estimate_matches_what_a_process_takes_random_llamas(tokenizer, world, name, chunk):
    check_estimate(llama_config(name, len(tokenizer)), tokenizer, world, name, chunk, allocator="default")


@linux_only
@pytest.mark.slow
def test_the_auto_chunk_fits_the_free_memory_it_was_given(tokenizer, world):
    """chunk_size="auto" plans with 80 % of the free memory: a process given F bytes free, at the chunk that
    auto_chunk_size picks for it, takes less than F (weights and all), with glibc as it comes."""
    from geffect_lab.memory import BUDGET_FRACTION

    cfg = llama_config("llama30m", len(tokenizer))
    sets = measured_sets(world)
    seq_len = longest_row(tokenizer, sets)
    plan = estimate_memory(cfg, 32, seq_len, chunk_size=12, n_samples=len(sets["forget"]), device="cpu")
    free = plan["peak_resident"] / BUDGET_FRACTION  # a machine on which auto picks a chunk near 12
    chunk = auto_chunk_size(cfg, 32, seq_len, budget_bytes=BUDGET_FRACTION * free, n_samples=len(sets["forget"]),
                            device="cpu")
    assert 8 <= chunk <= 16
    taken = plan["weights"] + measure("llama30m", chunk, "default")["increment"]
    print(f"free {free / 2**20:.0f} MiB, chunk {chunk}: the call takes {taken / 2**20:.0f} MiB")
    assert taken < free


# ------------------------------------------------------------------------------------------ (c) chunk size
def test_auto_chunk_size_is_the_largest_that_fits(target):
    model, _ = target
    n, seq_len = 40, 48

    def peak(chunk):
        return estimate_memory(model, n, seq_len, chunk_size=chunk)["peak_resident"]

    for budget in (peak(3) + 1, (peak(7) + peak(8)) // 2, peak(13)):
        chunk = auto_chunk_size(model, n, seq_len, budget_bytes=budget)
        assert peak(chunk) <= budget < peak(chunk + 1)
        assert all(peak(c) > budget for c in range(chunk + 1, n + 1))
    assert auto_chunk_size(model, n, seq_len, budget_bytes=peak(n)) == n
    need = peak(1)
    with pytest.raises(ValueError, match=rf"budget of {(need - 2**20) / 2**20:.1f} MiB.*peak is {need / 2**20:.1f}"):
        auto_chunk_size(model, n, seq_len, budget_bytes=need - 2**20)
    assert 1 <= auto_chunk_size(model, n, seq_len) <= n  # the default budget: 80 % of this machine's free memory


# ------------------------------------------------------------------------------------------ the worker
def _resident(field: str = "VmRSS:") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _release_and_reset_peak() -> None:
    """Freed heap back to the system, and the peak resident size reset to the current one (Linux)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # the warm-up's peak is far below the measured call's
        pass


def _worker(args: dict) -> dict:
    torch.set_num_threads(1)
    model, tok = gl.zoo.load("target")
    if args["model"] in SHAPES:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(args["model"], len(tok))).float().eval()
    sets = measured_sets(gl.load_world())
    # a one-instance call first, so that code and lazy initialisations paged in on first use are not counted
    gl.g_effect(model, tok, "npo+gd", forget=sets["forget"][:1], retain=sets["retain"][:1],
                targets={k: v[:1] for k, v in sets["targets"].items()}, chunk_size=1)
    _release_and_reset_peak()
    before = _resident()
    gl.g_effect(model, tok, "npo+gd", **sets, chunk_size=args["chunk"])
    # VmHWM, not getrusage's ru_maxrss: exec() carries the parent's peak into ru_maxrss, so a child of a large
    # pytest process would report the parent's size; VmHWM is this process's own, reset by clear_refs above
    peak = _resident("VmHWM:")
    return {"increment": peak - before, "before": before, "peak": peak}


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))


def test_g_effect_with_chunk_size_auto_gives_the_same_numbers(target, world):
    model, tok = target
    args = dict(forget=world["forget05"][:4], targets={"targeted": world["forget05"][4:8]}, pg=False)
    auto = gl.g_effect(model, tok, "npo", chunk_size="auto", **args)
    one = gl.g_effect(model, tok, "npo", chunk_size=1, **args)
    assert gl.testing.relative_error(auto.g_effect, one.g_effect) <= 1e-5  # float32 model, other row batching
    for bad in (0, -3, 2.5, "big"):
        with pytest.raises(ValueError, match=f"chunk_size={bad!r} is not valid"):
            gl.g_effect(model, tok, "npo", chunk_size=bad, **args)


def test_unlearn_takes_chunk_size_auto_and_refuses_a_bad_one(target, world):
    model, tok = target
    args = dict(forget=world["forget05"][:4], eval={"targeted": world["forget05"][4:8]}, steps=1, progress=False,
                record=("g_effect",))
    auto = gl.unlearn(model, tok, "ga", chunk_size="auto", **args)
    plain = gl.unlearn(model, tok, "ga", chunk_size=2, **args)
    assert gl.testing.relative_error(auto.g_effect, plain.g_effect) <= 1e-5
    with pytest.raises(ValueError, match="chunk_size=-1 is not valid"):
        gl.unlearn(model, tok, "ga", chunk_size=-1, **args)
