"""load_world (bundled and real TOFU files) and encode."""

from __future__ import annotations

import json

import pytest
import torch

import geffect_lab as gl
from geffect_lab.data import PromptTemplate, WorldFormatError


def test_bundled_world_ids_are_stable_and_unique(world):
    again = gl.load_world()
    for split in world:
        ids = [e.id for e in world[split]]
        assert len(set(ids)) == len(ids)
        assert ids == [e.id for e in again[split]]
    first = world["forget05"][0]
    assert first.id == f"forget05/a{first.author}/q0"
    assert first.author == 95  # the last 5 of 100 authors
    # the same QA pair keeps its author and question number in every split
    in_full = {e.id.split("/", 1)[1]: e for e in world["full"]}
    for e in world["forget05"] + world["retain_perturbed"]:
        twin = in_full[e.id.split("/", 1)[1]]
        assert (twin.question, twin.answer) == (e.question, e.answer)


def test_perturbed_answers_are_joined_to_their_questions(world):
    for e in world["forget10"] + world["retain_perturbed"] + world["world_facts"]:
        assert len(e.perturbed_answer) >= 3
    assert all(e.paraphrased_answer for e in world["forget10"])
    assert world.forget("forget05") is world["forget05"]
    assert world.retain("forget05") is world["retain95"]
    assert len(world.refusals) >= 50
    assert world["forget05"][0]["question"] == world["forget05"][0].question  # reads like a TOFU dict


def test_real_tofu_files(tofu_path):
    tofu = gl.load_world(tofu_path)
    assert len(tofu.authors("full")) == 200
    assert len(tofu["forget05"]) == 200 and len(tofu["forget01"]) == 40 and len(tofu["forget10"]) == 400
    assert tofu.authors("forget05") == list(range(190, 200))
    assert tofu["forget05"][0].id == "forget05/a190/q0"
    assert all(len(e.perturbed_answer) == 5 and e.paraphrased_answer for e in tofu["forget05"])
    assert len(tofu["retain95"]) == 3800
    assert len(tofu["real_authors"]) == 100 and len(tofu["world_facts"]) == 117
    assert all(len(e.perturbed_answer) >= 3 for e in tofu["real_authors"] + tofu["world_facts"])
    assert len(tofu["retain_perturbed"]) == 400 and all(e.perturbed_answer for e in tofu["retain_perturbed"])
    assert len(tofu.refusals) == 100
    # the joined perturbed answers are the published ones for that question
    first = json.loads((tofu_path / "forget05_perturbed.json").read_text().splitlines()[0])
    assert list(tofu["forget05"][0].perturbed_answer) == first["perturbed_answer"]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_malformed_file_names_the_file_and_line(tmp_path):
    good = json.dumps({"question": "Q?", "answer": "A."})
    _write(tmp_path / "full.json", [good, good, "{not json", good])
    with pytest.raises(WorldFormatError, match=r"full\.json:3: not a JSON record"):
        gl.load_world(tmp_path)
    _write(tmp_path / "full.json", [good, json.dumps({"question": "Q2?"})])
    with pytest.raises(WorldFormatError, match=r"full\.json:2: .*'answer'"):
        gl.load_world(tmp_path)
    _write(tmp_path / "full.json", [json.dumps({"question": "Q?", "answer": "A.", "perturbed_answer": "x"})])
    with pytest.raises(WorldFormatError, match=r"full\.json:1: 'perturbed_answer' must be a list"):
        gl.load_world(tmp_path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(WorldFormatError, match="full.json: file not found"):
        gl.load_world(tmp_path)
    (tmp_path / "full.json").write_text("\n")
    with pytest.raises(WorldFormatError, match="holds no records"):
        gl.load_world(tmp_path)
    with pytest.raises(WorldFormatError, match="no such folder"):
        gl.load_world(tmp_path / "nowhere")


def test_unknown_split_lists_the_known_ones(world):
    with pytest.raises(KeyError, match="forget05"):
        world["forget50"]
    with pytest.raises(KeyError, match="not a forget split"):
        world.retain("retain95")


def test_encode_masks_padding_and_labels(world, tokenizer):
    examples = [world["forget05"][0], world["world_facts"][0], world["forget05"][3]]
    batch = gl.encode(tokenizer, examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == torch.long
    lengths = mask.sum(1)
    assert lengths.max() == ids.shape[1] and lengths.min() < ids.shape[1]  # mixed lengths
    for i, example in enumerate(examples):
        n = int(lengths[i])
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert (ids[i, n:] == tokenizer.pad_token_id).all() and (labels[i, n:] == -100).all()
        answer_pos = (labels[i] != -100).nonzero().squeeze(1)
        # the labels are the answer's tokens at the same positions as input_ids (the model shifts)
        assert torch.equal(labels[i, answer_pos], ids[i, answer_pos])
        assert answer_pos.tolist() == list(range(int(answer_pos[0]), n))  # a contiguous tail
        assert tokenizer.decode(ids[i, answer_pos]) == " " + example.answer + tokenizer.eos_token
        prompt = tokenizer.decode(ids[i, :int(answer_pos[0])])
        assert prompt == tokenizer.bos_token + gl.data.DEFAULT_TEMPLATE.prompt.format(question=example.question)


def test_encode_other_answers_templates_and_bad_input(world, tokenizer):
    ex = world["forget05"][:2]
    para = gl.encode(tokenizer, ex, answer_field="paraphrased_answer")
    pos = (para["labels"][0] != -100).nonzero().squeeze(1)
    assert tokenizer.decode(para["input_ids"][0, pos]).strip().startswith(ex[0].paraphrased_answer)
    tpl = PromptTemplate(prompt="Q: {question} A:", answer=" {answer}", eos=False)
    custom = gl.encode(tokenizer, ex, template=tpl)
    pos = (custom["labels"][0] != -100).nonzero().squeeze(1)
    assert tokenizer.decode(custom["input_ids"][0, pos]) == " " + ex[0].answer
    as_dicts = gl.encode(tokenizer, [e.to_dict() for e in ex])
    assert torch.equal(as_dicts["input_ids"], gl.encode(tokenizer, ex)["input_ids"])
    with pytest.raises(ValueError, match="empty"):
        gl.encode(tokenizer, [])
    with pytest.raises(ValueError, match="is not a known prompt template"):
        gl.encode(tokenizer, ex, template="chatml")
