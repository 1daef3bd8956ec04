"""The documentation's claims that code can check: every public function that returns a Dataset has a numpydoc
``Returns`` section naming its variables' dims, and those dims are the schema's; the wheel size the install page
states is checked by tests/test_wheel.py. (The site itself is built by ``make docs``, and in CI by ``make test``
after the notebook tests: docs/conf.py.)"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import geffect_lab as gl
from geffect_lab import schema

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = ("zoo", "objectives", "runs", "metrics", "schema", "testing", "plots", "widgets", "attribution")
# return xarray Datasets but carry no return annotation
UNANNOTATED = {"geffect_lab.evaluate": gl.evaluate, "geffect_lab.read_open_unlearning": gl.read_open_unlearning}
# return the Dataset they are given (checked or annotated), not one of their own
PASS_THROUGH = {"geffect_lab.schema.annotate", "geffect_lab.schema.validate"}
# dims a Dataset may hold in front of the schema's: the dim gl.combine / gl.load_sweep add
OUTER = {"objective", "run", "seed"}
NAMED_DIMS = re.compile(r"``(\w+)``\s*\[([\w, ]*)\]")


def _public_callables() -> dict[str, object]:
    out = {}
    for name in dir(gl):
        obj = getattr(gl, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            out[f"geffect_lab.{name}"] = obj
    for module_name in PUBLIC_MODULES:
        module = getattr(gl, module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out[f"geffect_lab.{module_name}.{name}"] = obj
    for qual, obj in list(out.items()):
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if inspect.isfunction(member) and not name.startswith("_"):
                    out[f"{qual}.{name}"] = member
    return out


def _returns_dataset(obj) -> bool:
    ann = inspect.signature(obj).return_annotation if callable(obj) else None
    return isinstance(ann, str) and re.search(r"\bDataset\b", ann) is not None or ann is not None and (
        getattr(ann, "__name__", "") == "Dataset")


DATASET_RETURNING = {q: o for q, o in _public_callables().items()
                     if inspect.isfunction(o) and _returns_dataset(o) and q not in PASS_THROUGH} | UNANNOTATED


def test_the_dataset_returning_functions_are_found():
    for name in ("geffect_lab.g_effect", "geffect_lab.unlearn", "geffect_lab.replay", "geffect_lab.load",
                 "geffect_lab.combine", "geffect_lab.load_sweep", "geffect_lab.GEffectRecorder.dataset"):
        assert name in DATASET_RETURNING, name


@pytest.mark.parametrize("qualname", sorted(DATASET_RETURNING))
def test_returned_datasets_name_their_dims(qualname):
    doc = inspect.getdoc(DATASET_RETURNING[qualname]) or ""
    section = re.search(r"^Returns\n-------\n(.+?)(?:\n\n\S|\Z)", doc, re.M | re.S)
    assert section, f"{qualname}: no numpydoc 'Returns' section"
    text = section.group(1)
    assert text.splitlines()[0].strip().startswith("xarray.Dataset"), text.splitlines()[0]
    named = [(var, tuple(d.strip() for d in dims.split(",") if d.strip()))
             for var, dims in NAMED_DIMS.findall(text) if var in schema.VARIABLES]
    assert named, f"{qualname}: its Returns section names no variable with its dims"
    for var, dims in named:
        own = dims[1:] if dims and dims[0] in OUTER else dims
        valid = (schema.variable_dims(var), schema.variable_dims(var, run=False))
        assert own in valid, f"{qualname}: ``{var}`` {list(dims)}, but the schema's dims are {list(valid[0])}"



# ------------------------------------------------------------------------------------- the pages' code runs
# Every code block of README.md and docs/**/*.md runs as written (tests/test_docs.py::test_the_documented_code_runs):
# - a page's Python blocks run in order in one fresh interpreter, as a reader pastes them into a notebook or a
#   Python prompt (``__name__ == "__main__"``; tracebacks point at the page's lines); a block that holds
#   ``if __name__ == "__main__":`` is a script and runs as its own file (``python block.py``), as it must; a block
#   the page says to save as a file is saved, and what follows imports or reads it;
# - a shell block that calls ``geffect-lab`` runs in bash (``-e -o pipefail``), with ``geffect-lab`` this checkout's
#   CLI; other shell blocks (make, pip) are listed as not run;
# - all in one temporary folder per page, offline, one torch thread per process, on the bundled world.
# HTML comments right before a block (invisible on GitHub and on the site) tell the test what the page says in words:
#   <!-- docs-test: skip: REASON -->            not run (the test lists it with REASON: NOT_RUN below)
#   <!-- docs-test: replace: OLD => NEW -->     run with the text OLD (which must occur) replaced by NEW: smaller
#                                               step counts and seed lists, so that CI runs the recipe in seconds
#   <!-- docs-test: save-as: NAME -->           the block is written to NAME ("save this as NAME"), for what
#                                               follows to import or read (a Python module, a sweep's YAML spec)
#   <!-- docs-test: file: NAME <= PATH -->      the repository's file PATH is copied to NAME first (a file the
#                                               recipe reads and a user has, e.g. an open-unlearning TOFU_EVAL.json)
DOC_PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")
                                  if "_build" not in p.parts)]
PYTHON, SHELL = {"python", "py", "python3"}, {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"^<!--\s*docs-test:\s*([\w-]+):\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```\s*([^\s`]*)\s*$")
# blocks that are not run, by page and reason (a new one is a decision: add it here too)
NOT_RUN = [
    ("README.md", "a shell block that does not call geffect-lab"),
    ("docs/install.md", "a shell block that does not call geffect-lab"),
    ("docs/install.md", "a shell block that does not call geffect-lab"),
]
# blocks being rewritten elsewhere (issue 31 item 1: replay): expected to fail until then, and to be removed from
# here once they run (strict: a block that runs while listed here fails the test)
PENDING = ()


@dataclass
class Block:
    page: str
    line: int        # the block's first line of code, 1-based
    lang: str
    source: str
    options: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def mode(self) -> str | None:
        """How it runs: "session", "script", "shell", "file" (saved, for what follows to use), or None (not run:
        :attr:`reason`)."""
        if self.reason:
            return None
        if self.options.get("save-as"):
            return "file"
        assert self.lang in PYTHON | SHELL, f"{self.where}: a {self.lang} block with markers but no save-as"
        if self.lang in SHELL:
            return "shell"
        return "script" if re.search(r"""^if __name__ == ["']__main__["']:""", self.source, re.M) else "session"

    @property
    def reason(self) -> str:
        if "skip" in self.options:
            return self.options["skip"][0]
        if self.lang in SHELL and "geffect-lab" not in self.source:
            return "a shell block that does not call geffect-lab"
        return ""

    def runnable_source(self) -> str:
        text = self.source
        for rule in self.options.get("replace", []):
            old, new = (part.strip() for part in rule.split("=>", 1))
            assert old in text, f"{self.where}: 'replace: {rule}' but the block has no {old!r}"
            text = text.replace(old, new)
        return text


def code_blocks(page: str) -> list[Block]:
    """The fenced blocks of a page that hold code (Python, shell, or a file a recipe saves), with their markers."""
    lines = (ROOT / page).read_text().splitlines()
    blocks, options, i = [], {}, 0
    while i < len(lines):
        marker, fence = MARKER.match(lines[i]), FENCE.match(lines[i])
        if marker:
            assert marker[1] in {"skip", "replace", "save-as", "file"}, f"{page}:{i + 1}: unknown marker {marker[1]!r}"
            options.setdefault(marker[1], []).append(marker[2])
        elif fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            lang = fence[1].lower()
            if lang in PYTHON | SHELL or options:
                code = "\n".join(lines[i + 1:end]) + "\n"
                blocks.append(Block(page, i + 2, "python" if lang in PYTHON else lang, code, options))
            options, i = {}, end
        elif lines[i].strip() and options:
            raise AssertionError(f"{page}:{i + 1}: a docs-test marker must stand right before a code block")
        i += 1
    return blocks


def test_every_code_block_runs_or_says_why_not():
    """The inventory: which blocks the code test leaves out, and why (a short, honest list), and markers that
    make sense (each replacement applies, each file exists)."""
    blocks = [b for page in DOC_PAGES for b in code_blocks(page)]
    not_run = [(b.page, b.reason) for b in blocks if b.mode is None]
    print("not run:\n" + "\n".join(f"  {b.where}: {b.reason}" for b in blocks if b.mode is None))
    assert not_run == NOT_RUN
    for b in blocks:
        b.runnable_source()
        for rule in b.options.get("file", []):
            assert (ROOT / rule.split("<=", 1)[1].strip()).is_file(), f"{b.where}: no file {rule}"
    pages = {b.page for b in blocks if b.mode}
    assert {"README.md", "docs/howto.md", "docs/guide.md", "docs/index.md", "docs/open_unlearning.md"} <= pages
    assert sum(b.mode == "script" for b in blocks) == 2  # the sweeps, as scripts under the __main__ guard
    assert [(b.page, b.lang, b.options["save-as"]) for b in blocks if b.mode == "file"] == [
        ("docs/howto.md", "python", ["mymodule.py"]), ("docs/howto.md", "yaml", ["spec.yaml"])]


def test_the_readme_names_every_registered_objective():
    readme = (ROOT / "README.md").read_text().replace("\n", " ")
    listed = re.search(r"names the objectives \(([\w, ]+); regularisers ([\w, ]+)\)", readme)
    assert listed, "README: the sentence that lists the objectives"
    assert listed[1].split(", ") == gl.list_objectives("forget")
    assert listed[2].split(", ") == gl.list_objectives("retain")


def _hermetic_env(folder: Path) -> dict[str, str]:
    """This checkout's package and CLI, one thread per process, nothing read from or written to the user's home."""
    bin_dir, home = folder / "bin", folder / "home"
    bin_dir.mkdir(parents=True)
    home.mkdir()
    cli = bin_dir / "geffect-lab"
    cli.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m geffect_lab "$@"\n')
    cli.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEFFECT_", "DASK_"))}
    return {**env, "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config"),
            "HF_HOME": str(home / "huggingface"), "MPLCONFIGDIR": str(home / "matplotlib"),
            "GEFFECT_CACHE_DIR": str(home / "geffect-cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "DASK_TEMPORARY_DIRECTORY": str(home / "dask"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in DOC_PAGES if any(b.mode for b in code_blocks(p))])
def test_the_documented_code_runs(page, tmp_path):
    blocks = [b for b in code_blocks(page) if b.mode]
    work = tmp_path / "work"
    work.mkdir()
    for b in blocks:
        for rule in b.options.get("file", []):
            name, source = (part.strip() for part in rule.split("<=", 1))
            shutil.copy(ROOT / source, work / name)
    plan = [{"where": b.where, "path": str(ROOT / b.page), "line": b.line, "mode": b.mode,
             "source": b.runnable_source(), "save_as": b.options.get("save-as", [])} for b in blocks]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, __file__, str(tmp_path / "plan.json"), str(tmp_path / "results.json")],
                          cwd=work, env=_hermetic_env(tmp_path), capture_output=True, text=True, timeout=900)
    results = json.loads((tmp_path / "results.json").read_text()) if (tmp_path / "results.json").exists() else []
    assert done.returncode == 0 and len(results) == len(plan), f"the driver failed:\n{done.stderr[-4000:]}"
    print("\n".join(f"{r['where']}: {'ran in ' + str(r['seconds']) + ' s' if r['ok'] else 'FAILED'}" for r in results))
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['where']} failed:\n{r['error']}" for r in failed)


def _drive(plan_path: str, results_path: str) -> None:
    """Run a page's blocks in order (see above), writing one result per block; the first unexpected failure stops
    the page (what follows would fail for its sake)."""
    import builtins
    import time
    import traceback

    session = {"__name__": "__main__", "__builtins__": builtins}
    sys.path.insert(0, "")  # as in a notebook or a Python prompt: modules saved in the folder import
    results = []
    for block in json.loads(Path(plan_path).read_text()):
        for name in block["save_as"]:
            Path(name).write_text(block["source"])
        started = time.monotonic()
        try:
            if block["mode"] == "session":
                exec(compile("\n" * (block["line"] - 1) + block["source"], block["path"], "exec"), session)
            elif block["mode"] in ("script", "shell"):
                name = f"{Path(block['path']).stem}_{block['line']}.{'py' if block['mode'] == 'script' else 'sh'}"
                Path(name).write_text(block["source"])
                command = [sys.executable, name] if block["mode"] == "script" else ["bash", "-eo", "pipefail", name]
                ran = subprocess.run(command, capture_output=True, text=True, timeout=600)
                if ran.returncode:
                    raise RuntimeError(f"{' '.join(command)} exited with {ran.returncode}\n{ran.stdout[-3000:]}\n"
                                       f"{ran.stderr[-3000:]}")
            results.append({"where": block["where"], "ok": True, "seconds": round(time.monotonic() - started, 1)})
        except BaseException:  # noqa: BLE001 - a block's failure, SystemExit included, is its result
            results.append({"where": block["where"], "ok": False, "error": traceback.format_exc()[-6000:]})
            if not block["pending"]:
                break
        finally:
            Path(results_path).write_text(json.dumps(results, indent=1))
    for block in json.loads(Path(plan_path).read_text())[len(results):]:
        results.append({"where": block["where"], "ok": False, "error": "not run: an earlier block failed"})
    Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    _drive(*sys.argv[1:3])
