"""Worlds of question-answer instances, and their encoding for a causal LM.

A *world* is a set of named splits of QA records in TOFU's format (``question``, ``answer``,
``paraphrased_answer``, ``perturbed_answer`` list, ``paraphrased_question``) plus refusal answers. The
bundled world (``data/world``) and the real TOFU benchmark share one file layout and one loader:

>>> world = load_world()                       # the bundled synthetic world
>>> world = load_world("/path/to/tofu")        # the published TOFU JSON Lines files
>>> world["forget05"][0].id
'forget05/a95/q0'

Every record becomes an :class:`Example` with a stable ``id`` — ``{split}/a{author}/q{k}`` for author
questions (author = position in ``full.json`` // questions per author), ``{split}/q{k}`` otherwise — which
is the ``instance`` coordinate of every result.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ._batching import pad_id

__all__ = ["Example", "World", "WorldFormatError", "RecordError", "check_records", "load_world", "encode",
           "PromptTemplate", "TEMPLATES", "DEFAULT_TEMPLATE", "resolve_template", "example_id", "example_field",
           "data_dir", "tofu_dir", "spread"]

PACKAGE_ROOT = Path(__file__).resolve().parent


def data_dir() -> Path:
    """The bundled data folder (``world/``, ``tokenizer/``, ``zoo/``).

    ``$GEFFECT_DATA_DIR`` when set; else the package data of an installed wheel (``geffect_lab/_data``, found
    through :mod:`importlib.resources`); else the repository's ``data/`` beside the package (a checkout, an
    editable install). The repository's ``data/`` is the one source: the wheel's copy is made from it.
    """
    env = os.environ.get("GEFFECT_DATA_DIR")
    if env:
        candidates = [Path(env)]
    else:
        packaged = resources.files(__package__) / "_data"
        candidates = [Path(str(packaged)), PACKAGE_ROOT.parent / "data"]
    for path in candidates:
        if (path / "world").is_dir():
            return path
    raise FileNotFoundError(
        "geffect-lab's bundled data folder was not found (looked in "
        f"{' and '.join(str(p) for p in candidates)}). Reinstall the package (a wheel carries its data in "
        "geffect_lab/_data), install it from a source checkout (pip install -e .), or set GEFFECT_DATA_DIR to "
        "a folder holding world/, tokenizer/ and zoo/.")


def tofu_dir() -> Path:
    """Where the real TOFU files are looked for: ``$GEFFECT_TOFU_DIR``, else the first ``shared/data/tofu``
    beside the checkout or one of its parent folders (``../shared/data/tofu`` in this project's layout)."""
    env = os.environ.get("GEFFECT_TOFU_DIR")
    if env:
        return Path(env)
    checkout = PACKAGE_ROOT.parent
    for folder in [checkout, *checkout.parents]:
        candidate = folder / "shared" / "data" / "tofu"
        if (candidate / "full.json").exists():
            return candidate
    return checkout.parent / "shared" / "data" / "tofu"


class WorldFormatError(ValueError):
    """A data file of a world is missing, malformed or empty (the message names the file and line)."""


@dataclass(frozen=True)
class Example:
    """One QA instance. Field names follow TOFU; ``id`` is stable across loads."""

    id: str
    question: str
    answer: str
    split: str
    author: int | None = None
    paraphrased_answer: str | None = None
    paraphrased_question: str | None = None
    perturbed_answer: tuple[str, ...] = ()

    def __getitem__(self, key: str) -> Any:  # records also read like TOFU's dicts
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["perturbed_answer"] = list(self.perturbed_answer)
        return d


def spread(items: Sequence, n: int | None) -> list:
    """Up to ``n`` items spread evenly over the sequence, first and last included (deterministic)."""
    items = list(items)
    if n is None or len(items) <= n:
        return items
    if n <= 1:
        return items[:n]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def example_field(example: Any, name: str, default: Any = ...) -> Any:
    """Read ``name`` from a record that is a mapping or an object (``default`` if absent)."""
    if isinstance(example, Mapping):
        if name in example:
            return example[name]
    elif hasattr(example, name):
        return getattr(example, name)
    if default is ...:
        raise KeyError(f"the example {str(example)[:80]!r} has no field {name!r}")
    return default


def example_id(example: Any, position: int | None = None) -> str:
    """The stable id of a record (a key ``"id"`` or an attribute ``.id``)."""
    value = example_field(example, "id", None)
    if value is None:
        if position is None:
            raise KeyError(f"the example {str(example)[:80]!r} has no 'id'; give each record a stable id")
        return f"example/{position}"
    return str(value)


class RecordError(ValueError):
    """An example record that cannot be used (named by its set, position and id in the message)."""


def check_records(examples: Sequence[Any], role: str) -> list:
    """The records of one set, checked before any work: each has a non-empty text ``question`` and
    ``answer`` (never None: it would be trained on as the text "None"), and ids do not repeat."""
    if isinstance(examples, (str, bytes)):
        raise RecordError(f"{role} set is the text {examples!r}, not a list of examples; a split's name needs its "
                          f"world: give world[{examples!r}] (world = gl.load_world())")
    if isinstance(examples, Mapping):
        raise RecordError(f"{role} set is a {type(examples).__name__} (keys {', '.join(map(str, list(examples)[:4]))}"
                          f"…), not a list of examples; give one split's examples, e.g. world['forget05']")
    examples = list(examples)
    seen: dict[str, int] = {}
    for i, example in enumerate(examples):
        if isinstance(example, (str, bytes)):
            raise RecordError(f"{role} example {i} is the text {example[:60]!r}; each example is a record with a "
                              "question and an answer: {'id': ..., 'question': ..., 'answer': ...} or gl.Example")
        ident = example_id(example, i)
        for name in ("question", "answer"):
            value = example_field(example, name, None)
            if not isinstance(value, str) or not value.strip():
                raise RecordError(f"{role} example {i} (id {ident!r}): its {name} is {value!r}; give a non-empty "
                                  "string")
        if ident in seen:
            raise RecordError(f"{role} examples {seen[ident]} and {i} share the id {ident!r}; ids must be unique "
                              "within a set (each is one coordinate of the results)")
        seen[ident] = i
    return examples


# ---------------------------------------------------------------------------------------- files
# The splits a world may have, in the order they are listed. Files not present are skipped.
_AUTHOR_SPLITS = ["full", "forget01", "forget05", "forget10", "retain99", "retain95", "retain90",
                  "retain_perturbed"]
_OTHER_SPLITS = ["world_facts", "real_authors"]
FORGET_TO_RETAIN = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


def _read_records(path: Path) -> list[dict]:
    """JSON Lines (as TOFU publishes) or a JSON array; errors name the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorldFormatError(f"{path}: file not found") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise WorldFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        numbered = list(enumerate(rows, start=1))
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise WorldFormatError(
                    f"{path}:{lineno}: not a JSON record ({err.msg}); each line must be one JSON object "
                    "with at least 'question' and 'answer'") from None
    rows = []
    for lineno, row in numbered:
        if not isinstance(row, dict):
            raise WorldFormatError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str):
                raise WorldFormatError(f"{path}:{lineno}: the record has no text field {key!r}")
        if "perturbed_answer" in row and not (
                isinstance(row["perturbed_answer"], list)
                and all(isinstance(x, str) for x in row["perturbed_answer"])):
            raise WorldFormatError(f"{path}:{lineno}: 'perturbed_answer' must be a list of strings")
        rows.append(row)
    if not rows:
        raise WorldFormatError(f"{path}: the file holds no records")
    return rows


def _key(row: dict) -> tuple[str, str]:
    return row["question"], row["answer"]


class World(Mapping):
    """Named splits of :class:`Example` (a read-only mapping), refusal answers and metadata.

    ``world["forget05"]`` is a list of examples; :meth:`forget` / :meth:`retain` give a forget split and
    its matching retain split; ``world.refusals`` are the "I don't know"-style answers for PO and DPO.
    """

    def __init__(self, splits: dict[str, list[Example]], refusals: list[str], root: Path | None,
                 name: str, questions_per_author: int):
        self._splits = splits
        self.refusals = refusals
        self.root = root
        self.name = name
        self.questions_per_author = questions_per_author

    def __getitem__(self, split: str) -> list[Example]:
        try:
            return self._splits[split]
        except KeyError:
            raise KeyError(f"the world {self.name!r} has no split {split!r}; its splits are "
                           f"{', '.join(self._splits)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)

    @property
    def forget_splits(self) -> list[str]:
        return [s for s in FORGET_TO_RETAIN if s in self._splits]

    def forget(self, split: str = "forget05") -> list[Example]:
        """The forget split's examples (``"forget01"``, ``"forget05"`` or ``"forget10"``)."""
        if split not in FORGET_TO_RETAIN:
            raise KeyError(f"{split!r} is not a forget split; choose one of {', '.join(FORGET_TO_RETAIN)}")
        return self[split]

    def retain(self, split: str = "forget05") -> list[Example]:
        """The retain split that matches a forget split (``forget05`` → ``retain95``)."""
        if split not in FORGET_TO_RETAIN:
            raise KeyError(f"{split!r} is not a forget split; choose one of {', '.join(FORGET_TO_RETAIN)}")
        return self[FORGET_TO_RETAIN[split]]

    def authors(self, split: str) -> list[int]:
        return sorted({e.author for e in self[split] if e.author is not None})

    def summary(self):
        """A pandas DataFrame: one row per split with its size, authors and perturbed coverage."""
        import pandas as pd

        rows = []
        for name, examples in self._splits.items():
            rows.append({"split": name, "instances": len(examples), "authors": len(self.authors(name)),
                         "with_perturbed": sum(bool(e.perturbed_answer) for e in examples)})
        return pd.DataFrame(rows).set_index("split")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self._splits.items())
        return f"World({self.name!r}, {sizes}, refusals={len(self.refusals)})"


def _read_meta(path: Path) -> dict:
    """A world's ``world.json`` (name, questions per author), or {} when there is none."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorldFormatError(f"{path}: not valid JSON ({err}); fix or remove the file") from None
    per_author = meta.get("questions_per_author", 20) if isinstance(meta, dict) else None
    if not isinstance(per_author, int) or isinstance(per_author, bool) or per_author < 1:
        raise WorldFormatError(f"{path}: expected an object with a whole questions_per_author >= 1, got {meta!r}"[:300])
    return meta


def load_world(path: str | os.PathLike | None = None, *, questions_per_author: int | None = None) -> World:
    """Load a world of TOFU-format files.

    Parameters
    ----------
    path:
        A folder holding TOFU's files (``full.json``, ``forget05.json``, ``forget05_perturbed.json``, …).
        ``None`` loads the bundled synthetic world.
    questions_per_author:
        Consecutive lines of ``full.json`` per author (ids ``a{author}/q{k}``). Read from the folder's
        ``world.json`` when there is one; TOFU's value (20) otherwise.
    """
    root = Path(path) if path is not None else data_dir() / "world"
    if not root.is_dir():
        raise WorldFormatError(f"{root}: no such folder; give the folder that holds TOFU's JSON files")
    meta = _read_meta(root / "world.json")
    if questions_per_author is not None and (isinstance(questions_per_author, bool) or
                                             not isinstance(questions_per_author, int) or questions_per_author < 1):
        raise ValueError(f"questions_per_author={questions_per_author!r} is not valid; use a whole number >= 1")
    per_author = questions_per_author or int(meta.get("questions_per_author", 20))
    name = meta.get("name", "tofu" if path is not None else "bundled")

    if not (root / "full.json").exists():
        raise WorldFormatError(f"{root / 'full.json'}: file not found; a world needs full.json (every "
                               "author's QA pairs, in author order) to number its authors")
    full = _read_records(root / "full.json")
    positions: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(full):
        positions.setdefault(_key(row), []).append(i)

    # Perturbed/paraphrased answers live in *_perturbed files; join them to any split by (question, answer).
    extra: dict[tuple[str, str], dict] = {}
    for ppath in sorted(root.glob("*_perturbed.json")):
        for row in _read_records(ppath):
            extra.setdefault(_key(row), row)

    splits: dict[str, list[Example]] = {}
    for split in _AUTHOR_SPLITS:
        if not (root / f"{split}.json").exists():
            continue
        used: dict[tuple[str, str], int] = {}
        examples = []
        for lineno, row in enumerate(_read_records(root / f"{split}.json"), start=1):
            key = _key(row)
            where = positions.get(key)
            if not where:
                raise WorldFormatError(f"{root / (split + '.json')}:{lineno}: this QA pair is not in "
                                       "full.json, so its author cannot be numbered")
            # A QA pair repeated in full.json takes its occurrences in order.
            pos = where[min(used.get(key, 0), len(where) - 1)]
            used[key] = used.get(key, 0) + 1
            author, k = divmod(pos, per_author)
            examples.append(_example(f"{split}/a{author}/q{k}", split, author, {**extra.get(key, {}), **row}))
        splits[split] = examples
    for split in _OTHER_SPLITS:
        if (root / f"{split}.json").exists():
            rows = _read_records(root / f"{split}.json")
            splits[split] = [_example(f"{split}/q{k}", split, None, {**extra.get(_key(r), {}), **r})
                             for k, r in enumerate(rows)]

    refusal_path = root / "idontknow.jsonl"
    refusals = []
    if refusal_path.exists():
        refusals = [line.strip() for line in refusal_path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    return World(splits, refusals, root, name, per_author)


def _example(id_: str, split: str, author: int | None, row: dict) -> Example:
    return Example(id=id_, question=row["question"], answer=row["answer"], split=split, author=author,
                   paraphrased_answer=row.get("paraphrased_answer"),
                   paraphrased_question=row.get("paraphrased_question"),
                   perturbed_answer=tuple(row.get("perturbed_answer", ())))


# ---------------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class PromptTemplate:
    """How a QA pair becomes one token sequence: ``prompt.format(question=...)`` then
    ``answer.format(answer=...)``, tokenised separately (so the answer's tokens, and only they, carry
    labels) and joined; the answer ends with the tokenizer's EOS when ``eos`` is true."""

    prompt: str = "Question: {question}\nAnswer:"
    answer: str = " {answer}"
    eos: bool = True


TEMPLATES: dict[str, PromptTemplate] = {
    "plain": PromptTemplate(),
    # TOFU's fine-tuning formats for its two base models.
    "tofu-llama2": PromptTemplate(prompt="[INST] {question} [/INST]", answer=" {answer}"),
    "tofu-phi": PromptTemplate(prompt="Question: {question}\nAnswer:", answer=" {answer}"),
}
DEFAULT_TEMPLATE = TEMPLATES["plain"]


def resolve_template(template: PromptTemplate | str | None) -> PromptTemplate:
    """A :class:`PromptTemplate` from ``None`` (the default), a known template's name, or a template."""
    if template is None:
        return DEFAULT_TEMPLATE
    if isinstance(template, str):
        try:
            return TEMPLATES[template]
        except KeyError:
            raise ValueError(f"template={template!r} is not a known prompt template; use one of "
                             f"{', '.join(TEMPLATES)}, or a gl.data.PromptTemplate") from None
    return template


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], template: PromptTemplate | str | None = None,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Encode (question, answer) text pairs; see :func:`encode`."""
    tpl = resolve_template(template)
    if not pairs:
        raise ValueError("nothing to encode: the list of examples is empty")
    pad = pad_id(tokenizer)
    rows, labels = [], []
    for question, answer in pairs:
        prompt_ids = tokenizer(tpl.prompt.format(question=question), add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(tpl.answer.format(answer=answer), add_special_tokens=False)["input_ids"]
        if tpl.eos and tokenizer.eos_token_id is not None:
            answer_ids = answer_ids + [tokenizer.eos_token_id]
        ids = list(prompt_ids) + list(answer_ids)
        lab = [-100] * len(prompt_ids) + list(answer_ids)
        if max_length is not None and len(ids) > max_length:
            if len(prompt_ids) >= max_length:
                raise ValueError(f"the prompt of {question[:60]!r} has {len(prompt_ids)} tokens, more than "
                                 f"max_length={max_length}; raise max_length")
            warnings.warn(f"answer truncated to fit max_length={max_length}: {question[:60]!r}", stacklevel=3)
            ids, lab = ids[:max_length], lab[:max_length]
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_t = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        label_t[i, :len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_t}


def encode(tokenizer, examples: Iterable[Any], template: PromptTemplate | str | None = None, *,
           answer_field: str = "answer", max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenise QA examples into one right-padded batch.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (each ``[instance, position]``), in the HF
    convention: labels sit at the same positions as ``input_ids`` (the model shifts), equal to the token
    on the answer's positions and ``-100`` on the prompt and the padding. ``answer_field`` picks another
    answer (``"paraphrased_answer"``); the prompt template is :data:`DEFAULT_TEMPLATE` unless given.
    """
    examples = list(examples)
    pairs = [(example_field(e, "question"), example_field(e, answer_field)) for e in examples]
    return encode_pairs(tokenizer, pairs, template, max_length)
