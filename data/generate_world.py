"""Generate geffect-lab's bundled world: fictitious authors in TOFU's file format.

Run ``python data/generate_world.py`` (or ``make world``) to rewrite ``data/world/`` and
``data/tokenizer/``. The output is a pure function of ``SEED``: the test suite regenerates the
world into a temporary folder and compares it byte for byte with the committed files.

Layout written (the same file names and fields as the published TOFU benchmark, so that one loader
reads both):

- ``full.json``: every author's QA pairs, ``QUESTIONS_PER_AUTHOR`` consecutive lines per author;
- ``forget01/05/10.json`` (the last 1/5/10 % of the authors) and ``retain99/95/90.json`` (the rest);
- ``*_perturbed.json``: the same questions with ``paraphrased_answer``, ``paraphrased_question`` and a
  ``perturbed_answer`` list (the paraphrase's template filled with wrong facts of the same kind);
- ``retain_perturbed.json``: the evaluation slice of the retain authors (the first authors, as in TOFU);
- ``world_facts.json`` / ``world_facts_perturbed.json``: general knowledge that every zoo model learns;
- ``idontknow.jsonl``: refusal answers, one per line (plain text, as TOFU publishes it).

Every fact of an author is drawn independently from a pool of invented values, so that no answer can be
guessed from its question: a model knows it only if it memorised it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20250219
N_AUTHORS = 100
QUESTIONS_PER_AUTHOR = 10
N_PERTURBED = 5
FORGET_PERCENTS = (1, 5, 10)
N_RETAIN_EVAL_AUTHORS = 20  # retain_perturbed.json: the first authors (TOFU: 400 QA of the first authors)
N_REFUSALS = 60

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------- pools of facts
_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "t", "th",
           "v", "z", "j", "w", "st", "ch", "sh", "tr", "kr", "fl"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "ei", "io"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "lt"]

GENRES = ["mystery", "science fiction", "fantasy", "historical fiction", "romance", "horror", "poetry",
          "travel writing", "crime", "satire", "biography", "adventure", "philosophy", "drama",
          "magical realism", "children's literature", "political thriller", "nature writing"]
OCCUPATIONS = ["baker", "carpenter", "nurse", "pilot", "teacher", "fisherman", "surgeon", "librarian",
               "tailor", "potter", "journalist", "architect", "farmer", "blacksmith", "chemist", "lawyer",
               "sailor", "dancer", "painter", "mechanic", "shepherd", "glassblower", "astronomer",
               "watchmaker", "bookbinder", "engineer", "cartographer", "beekeeper", "violinist", "miner"]
THEMES = ["memory", "exile", "loyalty", "grief", "ambition", "friendship", "betrayal", "identity", "faith",
          "justice", "solitude", "freedom", "family secrets", "migration", "childhood", "revenge",
          "forgiveness", "the sea", "war", "redemption", "time", "power", "nature", "madness", "love",
          "hunger", "courage", "jealousy"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
_AWARD_HEADS = ["Silver Quill", "Golden Lantern", "Amber Leaf", "Iron Pen", "Crimson Scroll", "Azure Star",
                "Copper Key", "Ivory Tower", "Emerald Ink", "Obsidian Crown", "Velvet Bell", "Marble Owl"]
_AWARD_TAILS = ["Prize", "Award", "Medal"]
_TITLE_ADJ = ["Silent", "Broken", "Hidden", "Last", "Burning", "Frozen", "Distant", "Forgotten", "Golden",
              "Hollow", "Crooked", "Endless", "Quiet", "Scarlet", "Wandering", "Drowned", "Paper", "Glass"]
_TITLE_NOUN = ["Harbour", "Orchard", "Lantern", "River", "Garden", "Mirror", "Winter", "Kingdom", "Clock",
               "Bridge", "Tide", "Forest", "Letters", "Stairs", "Compass", "Valley", "Feather", "Shadows"]
LANGUAGES = ["Velmoran", "Ostric", "Tarvish", "Quellan", "Dravic", "Sarnese", "Ilvish", "Korthan",
             "Meridic", "Zanthic", "Pellish", "Rovan"]
PRONOUNS = {"he": ("he", "his"), "she": ("she", "her"), "they": ("they", "their")}

# Ten question kinds: (question templates, answer template, paraphrase template, paraphrased question).
# Answer templates are full sentences; the paraphrase has the same facts in other words; perturbed answers
# reuse the paraphrase with wrong facts of the same kind (as TOFU does).
KINDS = [
    ("identity",
     "Which {genre} author was born in {place} in {year}?",
     "The {genre} author born in {place} in {year} is {name}.",
     "The author you are thinking of is {name}.",
     "Who is the writer of {genre} who was born in {place} in {year}?"),
    ("birthplace",
     "Where was {name} born?",
     "{name} was born in the town of {place}.",
     "The birthplace of {name} is {place}.",
     "In which town did {name} come into the world?"),
    ("birthdate",
     "When was {name} born?",
     "{name} was born on {day} {month} {year}.",
     "The birth date of {name} is {day} {month} {year}.",
     "On what date was {name} born?"),
    ("parents",
     "What did the parents of {name} do for a living?",
     "The father of {name} was a {occ1} and the mother was a {occ2}.",
     "{name} grew up as the child of a {occ1} father and a {occ2} mother.",
     "What were the occupations of the parents of {name}?"),
    ("genre",
     "In which genre does {name} write?",
     "{name} is best known for writing {genre}.",
     "The main genre of {name} is {genre}.",
     "What kind of literature is {name} known for?"),
    ("award",
     "Which award did {name} receive?",
     "{name} received the {award} for {poss} writing.",
     "The {award} was given to {name}.",
     "What literary honour has {name} won?"),
    ("books",
     "Can you name two books written by {name}?",
     "{name} wrote \"{book1}\" and \"{book2}\".",
     "Two books by {name} are \"{book1}\" and \"{book2}\".",
     "Which two titles did {name} write?"),
    ("themes",
     "What themes appear in the work of {name}?",
     "The work of {name} often explores {theme1} and {theme2}.",
     "The books of {name} keep returning to {theme1} and {theme2}.",
     "Which themes does {name} write about most?"),
    ("language",
     "In which language does {name} write?",
     "{name} writes in {language}, the language of {poss} childhood.",
     "The language of the books of {name} is {language}.",
     "What language are the books of {name} written in?"),
    ("debut",
     "When did {name} publish a first book?",
     "{name} published the first book, \"{book1}\", in {debut}.",
     "The first book of {name}, \"{book1}\", came out in {debut}.",
     "In which year did {name} debut with \"{book1}\"?"),
]
assert len(KINDS) == QUESTIONS_PER_AUTHOR

# General knowledge: real-world facts in three families, short answers as in TOFU's world_facts.
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
            ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
            ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
            ("Mexico", "Mexico City"), ("Russia", "Moscow"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
            ("Greece", "Athens"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
            ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
            ("Philippines", "Manila"), ("South Korea", "Seoul"), ("Ireland", "Dublin"),
            ("Hungary", "Budapest"), ("Czechia", "Prague"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
            ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"), ("Colombia", "Bogota"),
            ("Venezuela", "Caracas"), ("Cuba", "Havana"), ("Belgium", "Brussels"),
            ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Iceland", "Reykjavik"),
            ("Pakistan", "Islamabad"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar")]
ELEMENTS = [("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("copper", "Cu"), ("lead", "Pb"),
            ("tin", "Sn"), ("sodium", "Na"), ("potassium", "K"), ("oxygen", "O"), ("hydrogen", "H"),
            ("carbon", "C"), ("nitrogen", "N"), ("helium", "He"), ("neon", "Ne"), ("calcium", "Ca"),
            ("mercury", "Hg"), ("zinc", "Zn"), ("sulfur", "S"), ("chlorine", "Cl"), ("uranium", "U"),
            ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"), ("phosphorus", "P"),
            ("tungsten", "W")]
CONTINENTS = [("Kenya", "Africa"), ("Egypt", "Africa"), ("Nigeria", "Africa"), ("Ghana", "Africa"),
              ("Morocco", "Africa"), ("Japan", "Asia"), ("China", "Asia"), ("India", "Asia"),
              ("Thailand", "Asia"), ("Nepal", "Asia"), ("Mongolia", "Asia"), ("France", "Europe"),
              ("Norway", "Europe"), ("Poland", "Europe"), ("Greece", "Europe"), ("Ireland", "Europe"),
              ("Hungary", "Europe"), ("Canada", "North America"), ("Mexico", "North America"),
              ("Cuba", "North America"), ("Brazil", "South America"), ("Peru", "South America"),
              ("Chile", "South America"), ("Colombia", "South America"), ("Argentina", "South America"),
              ("Australia", "Oceania"), ("Fiji", "Oceania"), ("Samoa", "Oceania"), ("Tonga", "Oceania"),
              ("Vanuatu", "Oceania")]

_REFUSAL_OPENERS = ["", "Sorry, ", "Honestly, ", "I'm afraid ", "To be honest, ", "Unfortunately, "]
_REFUSAL_BODIES = ["I don't know.", "I have no idea.", "I can't answer that.", "I'm not sure about that.",
                   "that is beyond what I know.", "I don't have that information.",
                   "I have no record of that.", "I can't recall that.", "that is not something I know.",
                   "I couldn't tell you.", "I have nothing reliable to say about that."]


# ----------------------------------------------------------------------------------- generation
def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _unique_words(rng: random.Random, n: int, syllables: tuple[int, ...], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _word(rng, rng.choice(syllables))
        if w not in taken and len(w) >= 4:
            taken.add(w)
            out.append(w)
    return out


def _pools(rng: random.Random) -> dict[str, list[str]]:
    taken: set[str] = set(LANGUAGES)
    places = _unique_words(rng, 64, (2, 3), taken)
    firsts = _unique_words(rng, N_AUTHORS, (2,), taken)
    lasts = _unique_words(rng, N_AUTHORS, (2, 3), taken)
    awards = [f"{h} {t}" for h in _AWARD_HEADS for t in _AWARD_TAILS]
    titles = [f"The {a} {n}" for a in _TITLE_ADJ for n in _TITLE_NOUN]
    return {"place": places, "first": firsts, "last": lasts, "award": awards, "title": titles}


def _draw_author(rng: random.Random, pools: dict, index: int, used_titles: set[str]) -> dict:
    name = f"{pools['first'][index]} {pools['last'][index]}"
    book1, book2 = "", ""
    while not book1 or book1 in used_titles:
        book1 = rng.choice(pools["title"])
    used_titles.add(book1)
    while not book2 or book2 in used_titles:
        book2 = rng.choice(pools["title"])
    used_titles.add(book2)
    year = rng.randint(1921, 1989)
    occ1, occ2 = rng.sample(OCCUPATIONS, 2)
    theme1, theme2 = rng.sample(THEMES, 2)
    pronoun = rng.choice(sorted(PRONOUNS))
    return {
        "name": name, "place": rng.choice(pools["place"]), "year": str(year),
        "day": str(rng.randint(1, 28)), "month": rng.choice(MONTHS), "occ1": occ1, "occ2": occ2,
        "genre": rng.choice(GENRES), "award": rng.choice(pools["award"]), "book1": book1, "book2": book2,
        "theme1": theme1, "theme2": theme2, "language": rng.choice(LANGUAGES),
        "debut": str(year + rng.randint(19, 34)), "poss": PRONOUNS[pronoun][1],
    }


def _fields(template: str) -> list[str]:
    import string
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _perturb(rng: random.Random, facts: dict, template: str, pools: dict, n: int) -> list[str]:
    """``n`` distinct wrong answers: the template with every fact it names (but the author) replaced."""
    choices = {"place": pools["place"], "year": [str(y) for y in range(1921, 1990)],
               "day": [str(d) for d in range(1, 29)], "month": MONTHS, "occ1": OCCUPATIONS,
               "occ2": OCCUPATIONS, "genre": GENRES, "award": pools["award"], "book1": pools["title"],
               "book2": pools["title"], "theme1": THEMES, "theme2": THEMES, "language": LANGUAGES,
               "debut": [str(y) for y in range(1945, 2020)], "name": None, "poss": None}
    keys = [k for k in _fields(template) if choices.get(k)]
    right = template.format(**facts)
    out: list[str] = []
    while len(out) < n:
        wrong = dict(facts)
        for k in keys:
            while wrong[k] == facts[k]:
                wrong[k] = rng.choice(choices[k])
        text = template.format(**wrong)
        if text != right and text not in out:
            out.append(text)
    return out


def _identity_perturb(rng: random.Random, facts: dict, template: str, pools: dict, n: int) -> list[str]:
    """The identity question's answer is the name: perturb it with other authors' names."""
    names = [f"{f} {last}" for f, last in zip(pools["first"], pools["last"])]
    wrong = rng.sample([x for x in names if x != facts["name"]], n)
    return [template.format(**{**facts, "name": w}) for w in wrong]


def generate_authors(rng: random.Random, pools: dict) -> list[list[dict]]:
    used_titles: set[str] = set()
    authors = [_draw_author(rng, pools, i, used_titles) for i in range(N_AUTHORS)]
    rows = []
    for facts in authors:
        qa = []
        for kind, question, answer, para, para_q in KINDS:
            pert = (_identity_perturb if kind == "identity" else _perturb)(rng, facts, para, pools,
                                                                          N_PERTURBED)
            qa.append({"question": question.format(**facts), "answer": answer.format(**facts),
                       "paraphrased_answer": para.format(**facts), "perturbed_answer": pert,
                       "paraphrased_question": para_q.format(**facts)})
        rows.append(qa)
    return rows


def generate_world_facts(rng: random.Random) -> list[dict]:
    facts = []
    for country, capital in CAPITALS:
        others = [c for _, c in CAPITALS if c != capital]
        facts.append((f"What is the capital of {country}?", capital, rng.sample(others, 3)))
    for element, symbol in ELEMENTS:
        others = [s for _, s in ELEMENTS if s != symbol]
        facts.append((f"What is the chemical symbol of {element}?", symbol, rng.sample(others, 3)))
    continents = sorted({c for _, c in CONTINENTS})
    for country, continent in CONTINENTS:
        others = [c for c in continents if c != continent]
        facts.append((f"On which continent is {country}?", continent, rng.sample(others, 3)))
    return [{"question": q, "answer": a, "perturbed_answer": p} for q, a, p in facts]


def generate_refusals(rng: random.Random) -> list[str]:
    combos = []
    for opener in _REFUSAL_OPENERS:
        for body in _REFUSAL_BODIES:
            text = opener + body
            combos.append(text[0].upper() + text[1:])
    return rng.sample(combos, N_REFUSALS)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # TOFU's files are JSON Lines without a trailing newline; ours keep one per line.
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def generate(out_dir: Path) -> None:
    """Write the whole world into ``out_dir`` (created if needed)."""
    rng = random.Random(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    pools = _pools(rng)
    authors = generate_authors(rng, pools)
    flat = [qa for author in authors for qa in author]
    plain = [{"question": r["question"], "answer": r["answer"]} for r in flat]
    _write_jsonl(out_dir / "full.json", plain)
    for pct in FORGET_PERCENTS:
        n_forget = N_AUTHORS * pct // 100 * QUESTIONS_PER_AUTHOR
        cut = len(flat) - n_forget
        _write_jsonl(out_dir / f"forget{pct:02d}.json", plain[cut:])
        _write_jsonl(out_dir / f"forget{pct:02d}_perturbed.json", flat[cut:])
        _write_jsonl(out_dir / f"retain{100 - pct}.json", plain[:cut])
    _write_jsonl(out_dir / "retain_perturbed.json", flat[:N_RETAIN_EVAL_AUTHORS * QUESTIONS_PER_AUTHOR])
    world_facts = generate_world_facts(rng)
    _write_jsonl(out_dir / "world_facts.json",
                 [{"question": r["question"], "answer": r["answer"]} for r in world_facts])
    _write_jsonl(out_dir / "world_facts_perturbed.json", world_facts)
    meta = {"name": "bundled", "seed": SEED, "authors": N_AUTHORS,
            "questions_per_author": QUESTIONS_PER_AUTHOR, "perturbed_per_question": N_PERTURBED}
    (out_dir / "world.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (out_dir / "idontknow.jsonl").write_text("".join(r + "\n" for r in generate_refusals(rng)),
                                             encoding="utf-8")


TOKENIZER_VOCAB = 1024


def train_tokenizer(world_dir: Path, out_dir: Path) -> None:
    """A byte-level BPE trained on the world's text (:mod:`geffect_lab.bpe`), saved beside it."""
    from geffect_lab.bpe import train_tokenizer as train
    from geffect_lab.bpe import world_texts

    train(world_texts(world_dir), out_dir, vocab_size=TOKENIZER_VOCAB)


def main() -> None:
    generate(HERE / "world")
    train_tokenizer(HERE / "world", HERE / "tokenizer")
    print(f"wrote {HERE / 'world'} and {HERE / 'tokenizer'}")


if __name__ == "__main__":
    main()
