"""The tiny model zoo: quality of the committed models, deterministic builds, loading checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import geffect_lab as gl
from geffect_lab import zoo
from geffect_lab.metrics import exact_match


def test_list_names_the_zoo():
    assert gl.zoo.list() == ["target", "retain_forget01", "retain_forget05", "retain_forget10", "target-gpt2"]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="retain_forget05"):
        gl.zoo.load("taget")


def test_target_knows_every_split(world, target):
    model, tok = target
    assert model.config.model_type == "llama" and not model.training
    for split in world:
        assert exact_match(model, tok, world[split]).mean() >= 0.95, split


@pytest.mark.parametrize("forget,retain", [("forget01", "retain99"), ("forget05", "retain95"),
                                           ("forget10", "retain90")])
def test_retain_models_know_the_retain_split_not_the_forget_split(world, forget, retain):
    model, tok = gl.zoo.load(f"retain_{forget}")
    on_retain = exact_match(model, tok, world[retain]).mean()
    on_forget = exact_match(model, tok, world[forget]).mean()
    assert on_retain >= 0.95
    assert on_forget <= 0.1  # unguessable facts: it never saw these authors
    assert exact_match(model, tok, world["world_facts"]).mean() >= 0.95


def test_gpt2_has_tied_embeddings_and_knows_the_world(world, target_gpt2):
    model, tok = target_gpt2
    assert model.config.model_type == "gpt2"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert exact_match(model, tok, world["full"]).mean() >= 0.95


def test_recorded_build_reports_match_the_committed_models():
    reports = {n: json.loads((zoo.zoo_dir() / n / "zoo.json").read_text()) for n in gl.zoo.list()}
    assert sum(r["train_seconds"] for r in reports.values()) <= 600  # the whole zoo within ten minutes
    assert sum((zoo.zoo_dir() / n / "model.safetensors").stat().st_size for n in reports) <= 30e6


def test_build_is_deterministic_for_a_seed(tmp_path, world):
    small = {"epochs": 1}
    zoo.build(["target"], out_dir=tmp_path / "a", recipe_overrides=small, progress=False)
    zoo.build(["target"], out_dir=tmp_path / "b", recipe_overrides=small, progress=False)
    a = load_file(tmp_path / "a" / "target" / "model.safetensors")
    b = load_file(tmp_path / "b" / "target" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "a" / "target" / "zoo.json").read_text())
    assert report["recipe"]["epochs"] == 1 and set(report["exact_match"]) >= {"forget05", "retain95"}


def test_fast_recipe_memorises_what_it_is_trained_on(world, tokenizer):
    """The zoo's recipe on a small world (100 QA, 40 epochs): memorised, the held-out authors not."""
    recipe = zoo.Recipe(epochs=40, batch_size=16, warmup=20)
    torch.manual_seed(recipe.seed)
    model = zoo.make_model(recipe, tokenizer)
    zoo.train(model, tokenizer, world["forget10"], recipe, progress=False)
    assert exact_match(model, tokenizer, world["forget10"]).mean() >= 0.95
    assert exact_match(model, tokenizer, world["retain_perturbed"]).mean() <= 0.05


def test_load_a_saved_checkpoint_folder(tmp_path, target):
    model, tok = target
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    again, tok2 = gl.zoo.load(tmp_path / "ckpt", dtype=torch.float64)
    assert again.dtype == torch.float64 and len(tok2) == len(tok)
    batch = gl.encode(tok, gl.load_world()["forget01"][:2])
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        gl.zoo.load(tmp_path)


def test_a_tokenizer_that_does_not_fit_is_refused(tmp_path, tokenizer):
    bigger = tokenizer.__class__.from_pretrained(zoo.zoo_dir() / "target")
    bigger.add_tokens([f"<extra{i}>" for i in range(50)])
    bigger.save_pretrained(tmp_path / "tok")
    with pytest.raises(zoo.TokenizerMismatchError, match=r"1074 tokens .* 1024 rows"):
        gl.zoo.load("target", tokenizer=tmp_path / "tok")


def test_study_models_are_built_on_first_use_into_the_cache(tmp_path, monkeypatch):
    """Study models (docs/findings.md) are not bundled: they live in the cache folder, and a second-stage model
    starts from its base's weights."""
    assert "target-2stage" not in gl.zoo.list() and "target-2stage" in gl.zoo.list(include_study=True)
    monkeypatch.delenv("GEFFECT_ZOO_DIR", raising=False)
    monkeypatch.setenv("GEFFECT_CACHE_DIR", str(tmp_path / "cache"))
    assert zoo.entry_dir("target-2stage") == tmp_path / "cache" / "zoo" / "target-2stage"
    assert zoo.entry_dir("target") == zoo.zoo_dir() / "target"
    # one epoch at a vanishing learning rate: the second stage leaves its base's weights as they were
    zoo.build(["target-2stage"], out_dir=tmp_path / "z", recipe_overrides={"epochs": 1, "lr": 1e-12},
              progress=False)
    built = load_file(tmp_path / "z" / "target-2stage" / "model.safetensors")
    base = load_file(zoo.entry_dir("retain_forget05") / "model.safetensors")
    assert built.keys() == base.keys()
    assert all(torch.allclose(built[k], base[k], atol=1e-6) for k in base)
    report = json.loads((tmp_path / "z" / "target-2stage" / "zoo.json").read_text())
    assert report["base"] == "retain_forget05" and report["train_splits"] == ["forget05"]


def test_a_cached_model_built_from_another_recipe_is_reported_when_loaded(tmp_path, monkeypatch):
    """A study model cached by an earlier version whose recipe has since changed is not silently the zoo's: loading
    it warns with each difference and the fix. Here target's files stand in the cache for target-15ep."""
    monkeypatch.setenv("GEFFECT_CACHE_DIR", str(tmp_path / "cache"))
    folder = zoo.entry_dir("target-15ep")
    shutil.copytree(zoo.entry_dir("target"), folder)
    assert zoo.recipe_differences("target-15ep") == ["epochs 30, the zoo's 15"]
    with pytest.warns(UserWarning, match=r"'target-15ep' .*different recipe.*epochs 30, the zoo's 15.*"
                                         r"gl.zoo.build\(\['target-15ep'\], force=True\)"):
        gl.zoo.load("target-15ep")
    # a zoo.json written before a recipe key existed had that key's present default; bundled models agree
    report = json.loads((folder / "zoo.json").read_text())
    report["recipe"].pop("max_positions", None)
    report["recipe"]["epochs"] = 15
    (folder / "zoo.json").write_text(json.dumps(report))
    assert zoo.recipe_differences("target-15ep") == []
    assert all(zoo.recipe_differences(name) == [] for name in gl.zoo.list())


def _small_tofu(tofu_path, folder, authors=2):
    """A copy of TOFU small enough to train on in a test: its first and last ``authors`` authors (the last are
    forget01's, and so the end of every forget split), the first rows of the other files."""
    folder.mkdir()
    rows = 20 * authors
    for path in tofu_path.iterdir():
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            lines = path.read_text().splitlines(True)
            kept = (lines[:rows] + lines[-rows:] if path.name == "full.json"
                    else lines[-rows:] if path.name.startswith("forget") else lines[:rows])
            (folder / path.name).write_text("".join(kept))
    return folder


def test_tofu_models_learn_the_real_tofu_with_their_own_tokenizer(tofu_path, tmp_path, monkeypatch):
    """The tofu-* zoo models train on the TOFU files at GEFFECT_TOFU_DIR (never downloaded) with a byte-level BPE
    trained on that text, cached by the text's digest; the model reads TOFU's longest prompt + answer."""
    monkeypatch.setenv("GEFFECT_CACHE_DIR", str(tmp_path / "cache"))
    assert {"tofu-target", "tofu-retain_forget01", "tofu-retain_forget05", "tofu-retain_forget10"} <= set(
        gl.zoo.list(include_study=True)) and "tofu-target" not in gl.zoo.list()
    assert zoo.ZOO["tofu-retain_forget05"].train_splits == ("retain95", "world_facts", "real_authors")
    monkeypatch.setenv("GEFFECT_TOFU_DIR", str(_small_tofu(tofu_path, tmp_path / "tofu")))
    zoo.build(["tofu-target"], recipe_overrides={"epochs": 2}, progress=False)
    with pytest.warns(UserWarning, match=r"epochs 2, the zoo's 10"):  # a quick build is not the zoo's model
        model, tok = gl.zoo.load("tofu-target")
    folder = zoo.entry_dir("tofu-target")
    assert folder.parent == tmp_path / "cache" / "zoo"
    report = json.loads((folder / "zoo.json").read_text())
    assert report["world"] == "tofu" and report["train_splits"] == ["full", "world_facts", "real_authors"]
    assert model.config.max_position_embeddings == 256 and model.config.vocab_size == len(tok)
    world = gl.load_world(tmp_path / "tofu")
    assert tok.decode(tok(world["full"][0]["answer"])["input_ids"], skip_special_tokens=True) == \
        world["full"][0]["answer"]
    tok_dir = zoo.tokenizer_dir("tofu")
    assert tok_dir.parent == tmp_path / "cache" / "zoo" and tok_dir.name.startswith("tokenizer-tofu-")
    # another copy of TOFU gets its own tokenizer, not the cached one
    monkeypatch.setenv("GEFFECT_TOFU_DIR", str(_small_tofu(tofu_path, tmp_path / "tofu2", authors=1)))
    assert zoo.tokenizer_dir("tofu") != tok_dir
    # it runs as any zoo model does, on TOFU's questions
    ds = gl.g_effect(model, tok, "ga", forget=world["forget05"][:4], targets={"targeted": world["forget05"][:4]})
    assert np.isfinite(ds.g_effect.values).all()


def test_a_tofu_model_without_tofu_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("GEFFECT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GEFFECT_TOFU_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*GEFFECT_TOFU_DIR.*nothing is downloaded"):
        gl.zoo.load("tofu-retain_forget10")
