"""The byte-level BPE tokenizers of the zoo, trained on a world's own text (the bundled world's, or TOFU's).

>>> bpe.train_tokenizer(bpe.world_texts("data/world"), "out/tokenizer", vocab_size=1024)

Deterministic: the same texts give the same files, byte for byte (the texts are de-duplicated and sorted).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["SPECIAL_TOKENS", "world_texts", "train_tokenizer"]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
TEXT_FIELDS = ("question", "answer", "paraphrased_answer", "paraphrased_question")


def world_texts(world_dir: str | os.PathLike) -> list[str]:
    """Every text of a world folder in TOFU's layout: questions, answers, paraphrases, perturbed answers (the
    ``*.json`` files, JSON Lines) and the refusals of ``idontknow.jsonl`` when there is one."""
    world_dir = Path(world_dir)
    texts = []
    for path in sorted(p for p in world_dir.glob("*.json") if p.name != "world.json"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            texts.extend(row[key] for key in TEXT_FIELDS if isinstance(row.get(key), str))
            texts.extend(t for t in row.get("perturbed_answer", []) if isinstance(t, str))
    refusals = world_dir / "idontknow.jsonl"
    if refusals.exists():
        texts.extend(refusals.read_text(encoding="utf-8").splitlines())
    return texts


def train_tokenizer(texts: list[str], out_dir: str | os.PathLike, vocab_size: int, model_max_length: int = 128):
    """Train a byte-level BPE on ``texts`` and save it for ``AutoTokenizer.from_pretrained(out_dir)``; a
    sequence starts with ``<s>`` (as Llama's tokenizers do). Returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(sorted(set(texts)), trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", model_max_length=model_max_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    # Name the class that every transformers release knows (4.x and 5.x alike).
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return tok
