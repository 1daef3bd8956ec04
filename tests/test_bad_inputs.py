"""An audit of bad inputs written apart from tests/test_reliability.py's table (which the boundary checks were
built against): the mistakes a new user makes with the API, the files and the command line, each with what it
must get. An error must be raised before any work, be one of the toolkit's named errors (never an
AttributeError or a torch message from deep inside), and name the bad value; where the input is legitimate
(a model in training mode, a parameter given as text) the result must be the right one. The outcome table is
written to docs/bad_inputs_audit.md."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import geffect_lab as gl
from geffect_lab.cli import main

ROOT = Path(__file__).resolve().parents[1]
# what a user's mistake may raise: the toolkit's named errors derive from these
USER_ERRORS = (ValueError, TypeError, KeyError, OSError)
INTERNAL = (AttributeError, IndexError, NameError, ZeroDivisionError, AssertionError, UnboundLocalError)


@dataclass
class Case:
    label: str
    call: object
    value: str = ""      # a regex the message must match: the bad value (and the argument) named
    fix: str = ""        # a regex for what to do instead; "" where the message cannot offer one
    check: object = None  # for a legitimate input: a function of the result that asserts it is right


@pytest.fixture(scope="module")
def setting(target, world):
    model, tok = target
    return model, tok, world, {"forget": world["forget01"][:2],
                               "targets": {"targeted": world["forget01"][2:4],
                                           "non_targeted": world["retain_perturbed"][:2]}}


def _api_cases(model, tok, world, g, tmp: Path) -> list[Case]:
    run = dict(world=world, steps=1, progress=False, record=("g_effect",))
    plain = gl.g_effect(model, tok, "npo", {"beta": 0.1}, **g)
    one = gl.g_effect(model, tok, "ga", **g)

    def in_training_mode():
        m = copy.deepcopy(model).train()
        return gl.g_effect(m, tok, "npo", **g), m

    def half_a_model():
        m = copy.deepcopy(model)
        m.model.layers[0].to(torch.float16)
        return gl.g_effect(m, tok, "ga", **g)

    def same_numbers(ds):
        np.testing.assert_array_equal(ds.g_effect.values, plain.g_effect.values)

    return [
        Case("g_effect: an objective name with a typo", lambda: gl.g_effect(model, tok, "npoo", **g),
             r"'npoo'", r"registered objectives are: .*npo"),
        Case("g_effect: a parameter name with a typo", lambda: gl.g_effect(model, tok, "npo", {"betta": 1}, **g),
             r"no parameter 'betta'", r"its parameters are: beta"),
        Case("g_effect: a parameter given as text", lambda: gl.g_effect(model, tok, "npo", {"beta": "0.1"}, **g),
             check=same_numbers),
        Case("g_effect: a parameter that is not a number", lambda: gl.g_effect(model, tok, "npo", {"beta": "x"}, **g),
             r"'beta' must be float, got 'x'", r"give e\.g\. beta=0\.5"),
        Case("g_effect: a boolean for a number", lambda: gl.g_effect(model, tok, "npo", {"beta": True}, **g),
             r"'beta' must be float, got True", r"give e\.g\. beta=0\.5"),
        Case("g_effect: an empty forget set", lambda: gl.g_effect(model, tok, "ga", forget=[], targets=g["targets"]),
             r"forget set is empty", r"needs forget samples"),
        Case("g_effect: the whole World as the forget set",
             lambda: gl.g_effect(model, tok, "ga", forget=world, targets=g["targets"]),
             r"forget set is a World", r"e\.g\. world\['forget05'\]"),
        Case("g_effect: a split's name as the forget set",
             lambda: gl.g_effect(model, tok, "ga", forget="forget01", targets=g["targets"]),
             r"the text 'forget01'", r"world\['forget01'\]"),
        Case("g_effect: plain strings as examples",
             lambda: gl.g_effect(model, tok, "ga", forget=["Who wrote it?"], targets=g["targets"]),
             r"example 0 is the text 'Who wrote it\?'", r"'question': \.\.\., 'answer'"),
        Case("g_effect: a record without an answer",
             lambda: gl.g_effect(model, tok, "ga", forget=[{"id": "a", "question": "q?"}], targets=g["targets"]),
             r"\(id 'a'\): its answer is None", r"give a non-empty string"),
        Case("g_effect: no target set", lambda: gl.g_effect(model, tok, "ga", forget=g["forget"], targets={}),
             r"targets=\{\}", r"targets=\{'targeted'"),
        Case("g_effect: an empty target set",
             lambda: gl.g_effect(model, tok, "ga", forget=g["forget"], targets={"probe": []}),
             r"target set 'probe' is empty", r"at least one instance"),
        Case("g_effect: the whole World as targets",
             lambda: gl.g_effect(model, tok, "ga", forget=g["forget"], targets=world),
             r"targets is a whole World", r"'targeted': world\['forget05'\]"),
        Case("g_effect: a fractional chunk_size", lambda: gl.g_effect(model, tok, "ga", chunk_size=2.5, **g),
             r"chunk_size=2\.5", r"whole number >= 1"),
        Case("g_effect: an unknown engine", lambda: gl.g_effect(model, tok, "ga", engine="fastest", **g),
             r"'fastest'", r"use one of fast, reference"),
        Case("g_effect: an unknown verify mode", lambda: gl.g_effect(model, tok, "ga", verify="sometimes", **g),
             r"verify='sometimes'", r"'first'.*'always' or 'never'"),
        Case("g_effect: an unknown prompt template", lambda: gl.g_effect(model, tok, "ga", template="chatml", **g),
             r"template='chatml'", r"use one of plain"),
        Case("g_effect: a model name instead of a model", lambda: gl.g_effect("target", tok, "ga", **g),
             r"not str 'target'", r"gl\.zoo\.load\('target'\)"),
        Case("g_effect: no tokenizer", lambda: gl.g_effect(model, None, "ga", **g),
             r"tokenizer must be a loaded tokenizer, not NoneType|tokenizer must be a loaded tokenizer .*NoneType",
             r"PreTrainedTokenizer"),
        Case("g_effect: a model whose layers are in two dtypes", half_a_model,
             r"mix floating dtypes: float32 .*float16", r"model\.to\(torch\.float32\)"),
        Case("g_effect: a model left in training mode (dropout)", in_training_mode,
             check=lambda r: (np.testing.assert_array_equal(r[0].g_effect.values, plain.g_effect.values),
                              r[1].training or pytest.fail("the model's own mode was not restored"))),
        Case("g_effect: PO without refusal answers", lambda: gl.g_effect(model, tok, "po", refusals=[], **g),
             r"no refusals were given", r"refusals=world\.refusals"),
        Case("unlearn: both steps and epochs", lambda: gl.unlearn(model, tok, "ga", world=world, steps=2, epochs=1,
                                                                  progress=False),
             r"steps=2 and epochs=1", r"give one of them"),
        Case("unlearn: a fractional number of steps", lambda: gl.unlearn(model, tok, "ga", world=world, steps=2.5,
                                                                         progress=False),
             r"steps=2\.5", r"whole number > 0"),
        Case("unlearn: a seed given as text", lambda: gl.unlearn(model, tok, "ga", seed="a", **run),
             r"seed='a'", r"whole number >= 0"),
        Case("unlearn: a variable name with a typo in record",
             lambda: gl.unlearn(model, tok, "ga", **{**run, "record": ("g_efect",)}),
             r"'g_efect'", r"choose from g_effect"),
        Case("unlearn: an unknown optimizer", lambda: gl.unlearn(model, tok, "ga", optimizer="lion", **run),
             r"'lion'", r"'sgd', 'adam' or 'adamw'"),
        Case("unlearn: an unknown forget split", lambda: gl.unlearn(model, tok, "ga", forget="forget99", **run),
             r"'forget99'", r"forget01, forget05, forget10"),
        Case("unlearn: a callback that is not a function", lambda: gl.unlearn(model, tok, "ga", callback=3, **run),
             r"callback=3", r"callback\(step, partial_dataset\)"),
        Case("unlearn: eval sets as a list", lambda: gl.unlearn(model, tok, "ga", eval=[1, 2], **run),
             r"got list", r"\{'targeted': world\['forget05'\]"),
        Case("unlearn: a negative weight decay", lambda: gl.unlearn(model, tok, "ga", weight_decay=-1, **run),
             r"weight_decay=-1", r"finite number >= 0"),
        Case("unlearn: save_every without a file", lambda: gl.unlearn(model, tok, "ga", save_every=1, **run),
             r"save_every", r"out="),
        Case("unlearn: attributions at a step past the run",
             lambda: gl.unlearn(model, tok, "ga", attribute_at=[99], **run),
             r"attribute_at", r"between 0 and 1"),
        Case("unlearn: results to a folder", lambda: gl.unlearn(model, tok, "ga", out=tmp, **run),
             r"it is a folder", r"a file name such as run\.nc"),
        Case("unlearn: results to a .csv name", lambda: gl.unlearn(model, tok, "ga", out=tmp / "r.csv", **run),
             r"r\.csv", r"ending in \.nc \(e\.g\. r\.nc\)"),
        Case("unlearn: a model with nothing trainable",
             lambda: gl.unlearn(copy.deepcopy(model).requires_grad_(False), tok, "ga", **run),
             r"no parameter of the model requires grad", r"p\.requires_grad_\(True\)"),
        Case("replay: a folder that does not exist", lambda: gl.replay(tmp / "nope"),
             r"nope: no such folder", r"checkpoint-\* folders"),
        Case("replay: a folder without checkpoints", lambda: gl.replay(tmp),
             r"no checkpoint-\* folders", r"save_strategy='steps'"),
        Case("replay: a dtype name with a typo", lambda: gl.replay(tmp, dtype="bfloat61"),
             r"dtype='bfloat61'", r"use one of float64, float32, float16, bfloat16"),
        Case("evaluate: n = -1", lambda: gl.evaluate(model, tok, world, n=-1),
             r"n=-1", r"whole number > 0"),
        Case("combine: the same label twice", lambda: gl.combine([one, one], labels=["a", "a"]),
             r"labels \['a'\] repeat", r"its own label"),
        Case("combine: fewer labels than runs", lambda: gl.combine([one, one], labels=["a"]),
             r"1 labels for 2 runs", r"one label per run"),
        Case("save: a dict instead of a Dataset", lambda: gl.save({"g_effect": 1}, tmp / "d.nc"),
             r"not dict", r"results Dataset"),
        Case("save: to a folder", lambda: gl.save(one, tmp), r"it is a folder", r"a file name such as run\.nc"),
        Case("load: a folder", lambda: gl.load(tmp), r"is a folder", r"gl\.load_sweep"),
        Case("load_world: questions_per_author = 0", lambda: gl.load_world(questions_per_author=0),
             r"questions_per_author=0", r"whole number >= 1"),
        Case("zoo.load: a name with a typo", lambda: gl.zoo.load("targett"),
             r"'targett'", r"the zoo has target"),
        Case("zoo.load: a dtype by its name", lambda: gl.zoo.load("target", dtype="float16"),
             check=lambda r: r[0].dtype == torch.float16 or pytest.fail(str(r[0].dtype))),
        Case("zoo.build: an unknown model", lambda: gl.zoo.build(["nosuch"], out_dir=tmp / "z", progress=False),
             r"nosuch", r"the zoo has target"),
        Case("layer_groups: a name instead of a model", lambda: gl.layer_groups("target"),
             r"not str 'target'", r"gl\.zoo\.load"),
        Case("estimate_memory: a negative count", lambda: gl.estimate_memory(model, -1, 10),
             r"n_instances=-1", r"whole number > 0"),
        Case("attribution.tokens: an unknown method",
             lambda: gl.attribution.tokens(model, tok, g["forget"], methods=("saliencyy",)),
             r"'saliencyy'", r"use integrated_gradients, feature_ablation"),
        Case("plots: a dict instead of a Dataset", lambda: gl.plots.layer_heatmap({"g_effect": 1}),
             r"not dict", r"results Dataset"),
        Case("plots: an instance the Dataset lacks", lambda: gl.plots.token_strip(one, "nobody/0"),
             r"instance='nobody/0'", r"its instance values include"),
        Case("plots: PG-effects that were not recorded", lambda: gl.plots.pg_scatter(one.drop_vars("pg_effect")),
             r"no pg_effect", r"record=\(\.\.\., 'pg_effect'\)"),
        Case("metrics.forget_quality: a NaN truth ratio", lambda: gl.metrics.forget_quality([math.nan, 1.0],
                                                                                           [1.0, 2.0]),
             check=lambda r: math.isnan(r) or pytest.fail(f"returned {r}, not NaN")),
        Case("sweep: an empty grid", lambda: gl.sweep({}, out=tmp / "sweep"),
             r"the grid is empty", r"give at least one value"),
    ]


CLI = [
    (["run", "-O", "ga", "--param", "beta"], r"--param takes NAME=VALUE \(e\.g\. beta=0\.1\), got 'beta'"),
    (["run", "-O", "npo", "--param", "beta=abc", "--steps", "1"], r"'beta' must be float, got 'abc'"),
    (["run", "-O", "ga", "--steps", "2", "--epochs", "1"], r"--epochs: not allowed with argument --steps"),
    (["run", "-O", "ga", "--steps", "1", "-o", "results.csv"], r"give a name ending in \.nc"),
    (["run", "-O", "ga", "--steps", "1", "--forget", "forget99"], r"invalid choice: 'forget99'"),
    (["run", "-O", "ga", "--steps", "1", "--model", "nosuchmodel"], r"unknown zoo model 'nosuchmodel'"),
    (["run", "-O", "ga", "--steps", "1", "--lr", "nan"], r"--lr: nan is not valid"),
    (["run", "-O", "ga", "--steps", "1", "--optimizer", "lion"], r"invalid choice: 'lion'"),
    (["run", "-O", "ga", "--steps", "1", "--record", "bogus"], r"cannot record \['bogus'\]"),
    (["info", "/nonexistent/run.nc"], r"/nonexistent/run\.nc: no such results file"),
    (["compare", "/nonexistent/a.nc"], r"/nonexistent/a\.nc: no such results file"),
    (["sweep", "/nonexistent/spec.yaml", "-o", "/nonexistent/out"], r"/nonexistent/spec\.yaml: no such sweep spec"),
    (["replay", "/nonexistent/run"], r"/nonexistent/run: no such folder"),
    (["demo", "--steps", "-1"], r"--steps: -1 is not valid"),
    (["world", "/nonexistent/world"], r"/nonexistent/world: no such folder"),
    (["zoo", "build", "nosuch"], r"unknown zoo model\(s\) nosuch"),
]


def _outcome(case: Case, tmp: Path) -> tuple[str, str]:
    """(outcome, message): 'right' (a legitimate input's right result), 'clear' (a named error with the value
    and the fix), 'names the value' (no fix offered), or a failure: 'silently wrong', 'unclear', 'created files'."""
    before = sorted(p.name for p in tmp.rglob("*"))
    try:
        result = case.call()
    except Exception as err:  # noqa: BLE001 - every outcome is classified
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        message = message.replace(str(tmp), "<tmp>")
        if case.check is not None or isinstance(err, INTERNAL) or not isinstance(err, USER_ERRORS):
            return "unclear", f"{type(err).__name__}: {message}"
        if not re.search(case.value, message):
            return "unclear", f"{type(err).__name__}: {message}"
        if sorted(p.name for p in tmp.rglob("*")) != before:
            return "created files", message
        return ("clear" if case.fix and re.search(case.fix, message) else "names the value"), \
            f"`{type(err).__name__}`: {message.splitlines()[0]}"
    if case.check is None:
        return "silently wrong", f"returned a {type(result).__name__}"
    case.check(result)
    return "right", "the right result"


def test_an_independent_set_of_bad_inputs(setting, tmp_path, capsys):
    model, tok, world, g = setting
    (tmp_path / "sub").mkdir()
    rows, outcomes = [], []
    for case in _api_cases(model, tok, world, g, tmp_path / "sub"):
        outcome, message = _outcome(case, tmp_path / "sub")
        outcomes.append(outcome)
        rows.append(f"| {case.label} | {outcome} | {message.replace('|', chr(92) + '|')} |")
    for argv, expected in CLI:
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1] if err.strip() else ""
        clear = code == 2 and "Traceback" not in err and re.search(expected, last)
        outcomes.append("clear" if clear else "unclear")
        rows.append(f"| `geffect-lab {' '.join(argv)}` | {'clear' if clear else 'unclear'} (exit {code}) | "
                    f"{last.replace('|', chr(92) + '|')} |")
    failures = [r for r, o in zip(rows, outcomes) if o in ("silently wrong", "unclear", "created files")]
    errors = [o for o in outcomes if o in ("clear", "names the value")]
    share = sum(o == "clear" for o in errors) / len(errors)
    counts = {k: outcomes.count(k) for k in ("right", "clear", "names the value", "silently wrong", "unclear",
                                             "created files")}
    (ROOT / "docs" / "bad_inputs_audit.md").write_text(
        "# An audit of bad inputs\n\nWritten by `tests/test_bad_inputs.py` (re-run it to regenerate): "
        f"{len(outcomes)} mistakes a new user makes with the API, the files and the command line, written apart "
        "from [the table the checks were built against](bad_inputs.md). *clear*: a named error, raised before any "
        "work or file, that names the bad value and what to do; *names the value*: the same without a fix to "
        "offer; *right*: a legitimate input that gets the right result.\n\n"
        + ", ".join(f"{k}: {v}" for k, v in counts.items())
        + f". Errors that name the value and the fix: {share:.0%}.\n\n| input | outcome | message |\n|---|---|---|\n"
        + "\n".join(rows) + "\n")
    assert not failures, "\n".join(failures)
    assert share >= 0.95, f"only {share:.0%} of the errors name the value and the fix"

