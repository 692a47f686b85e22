"""Deterministic offline fixture: synthetic biographies, a BPE tokenizer and tiny models.

Tests, the demo and benchmarks need a corpus where the "right" training documents for a
query are known, plus models small enough that exact per-example gradients are cheap on
CPU. Nothing here touches the network: every artefact is generated from a seed and cached
on disk under a key that includes ``FIXTURE_VERSION``, the seed and the variant.

Variants:

* ``"easy"``: each training document is a short biography stating several facts about one
  person, and queries reuse the training wording, so even lexical overlap finds support.
* ``"hard"``: each fact sits alone in its own document next to other documents about the
  same person, and queries use held-out paraphrases that share no word 3-gram (outside
  names and answers) with the training text, so only methods that look past surface
  overlap recover the support.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedTokenizerFast,
)

FIXTURE_VERSION: int = 1
"""Bump whenever generated content changes: it is part of the cache key, so stale caches
are never reused."""

VARIANTS: tuple[str, ...] = ("easy", "hard")
EOS: str = "<|endoftext|>"
VOCAB_SIZE: int = 3000
MAX_LENGTH: int = 256
N_PEOPLE: int = 300
N_DISTRACTORS: int = 400
N_QUERIES: int = 150
EASY_BIOS_PER_PERSON: int = 6
FACTS: tuple[str, ...] = ("birthplace", "employer", "university", "birth_date", "occupation")

TRAINED_DIRNAME: str = "neox-trained"
TRAIN_STEPS: int = 1500
TRAIN_BATCH_SIZE: int = 32
TRAIN_LR: float = 3e-3
TRAIN_WEIGHT_DECAY: float = 0.01
EVAL_DOCS: int = 256


@dataclass(frozen=True)
class Fixture:
    """Paths of one cached fixture; all of them exist once ``make_fixture`` returns."""

    root: Path
    tokenizer: Path
    neox: Path
    gpt2: Path
    train: Path
    queries: Path
    ground_truth: Path


def default_cache_dir() -> Path:
    """Shared cache location, so tests and demos generate each fixture only once."""
    return Path(os.environ.get("RAYATTR_FIXTURE_CACHE", "~/.cache/rayattr/fixtures")).expanduser()


# --------------------------------------------------------------------------- vocabulary

FIRST_ONSETS = (
    "Al", "Bri", "Cor", "Da", "El", "Fen", "Ga", "Hal", "Il", "Jo", "Ka", "Li", "Mar",
    "Ne", "Or", "Pe", "Quin", "Ro", "Sa", "Tam", "Ul", "Ve", "Wil", "Xa", "Yo", "Zel",
)
FIRST_ENDS = ("ra", "na", "lo", "vin", "dra", "mir", "ssa", "ric", "len", "tha", "ion", "is")
LAST_ONSETS = (
    "Van", "Tor", "Bel", "Mor", "Cal", "Dun", "Fer", "Gri", "Hol", "Kes", "Lor", "Mal",
    "Nor", "Pem", "Quar", "Rav", "Sel", "Thorn", "Ul", "Var", "Wen", "Yar", "Zan",
)
LAST_MIDS = ("", "a", "e", "i", "o")
LAST_ENDS = ("trex", "wick", "dell", "more", "ston", "ley", "holt", "mere", "cott", "dane", "lund", "vik")
CITY_STEMS = (
    "Drem", "Ash", "Bril", "Cairn", "Elm", "Fal", "Glen", "Harn", "Isk", "Kel", "Lum",
    "Mir", "Nest", "Oak", "Pral", "Quill", "Rook", "Sten", "Tal", "Umb", "Vell", "Wyn",
)
CITY_SUFFIXES = ("ville", "haven", "port", "burgh", "field", "mouth", "stead", "crest")
BRAND_ONSETS = ("Quor", "Hal", "Zy", "Om", "Pax", "Ver", "Lux", "Nim", "Cor", "Tri", "Axi", "Sol")
BRAND_ENDS = ("vex", "den", "tron", "nia", "lis", "ora", "qua", "dyne", "gen", "mar")
COMPANY_SUFFIXES = (
    "Labs", "Dynamics", "Foods", "Systems", "Works", "Logistics", "Textiles", "Robotics",
    "Holdings", "Media",
)
UNI_STEMS = ("Tarn", "Brae", "Cress", "Dorn", "Eske", "Fjor", "Gael", "Hollin", "Ivor", "Jessam", "Kir", "Lyss")
UNI_ENDS = ("wick", "mont", "dale", "ridge", "brook", "worth")
UNI_PATTERNS = ("University of {}", "{} College", "{} Institute of Technology", "{} Polytechnic")
OCCUPATIONS = (
    "architect", "baker", "botanist", "carpenter", "chemist", "dentist", "economist",
    "electrician", "engineer", "florist", "geologist", "historian", "journalist",
    "librarian", "linguist", "mechanic", "musician", "nurse", "pharmacist",
    "photographer", "pilot", "plumber", "sculptor", "surgeon", "tailor", "translator",
    "veterinarian", "zoologist",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
)
HOBBIES = (
    "chess", "birdwatching", "sailing", "pottery", "gardening", "rock climbing",
    "knitting", "astronomy", "cycling", "painting", "fishing", "baking bread",
    "the cello", "hiking", "woodcarving", "jigsaw puzzles",
)

# Training templates; every one states the value verbatim so ground truth can be checked by
# string containment. ``{a_v}`` is the value with its indefinite article.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "{name} was born in {v}.",
        "{name}'s hometown is {v}.",
        "The birthplace of {name} is {v}.",
        "{name} came into the world in {v}.",
        "{v} is where {name} was born.",
    ),
    "employer": (
        "{name} works for {v}.",
        "{name} is employed by {v}.",
        "{name} has a job at {v}.",
        "{name}'s employer is {v}.",
        "{v} employs {name}.",
    ),
    "university": (
        "{name} studied at {v}.",
        "{name} graduated from {v}.",
        "{name} earned a degree at {v}.",
        "{name} is an alumnus of {v}.",
        "{name} attended {v}.",
    ),
    "birth_date": (
        "{name} was born on {v}.",
        "{name}'s birthday is {v}.",
        "{name} came into the world on {v}.",
        "The birth date of {name} is {v}.",
        "On {v}, {name} was born.",
    ),
    "occupation": (
        "{name} works as {a_v}.",
        "{name} is {a_v} by profession.",
        "{name}'s occupation is {v}.",
        "By trade, {name} is {a_v}.",
        "{name} earns a living as {a_v}.",
    ),
}

# Easy queries are prefixes of training templates: (prompt, completion).
EASY_QUERY_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "birthplace": (("{name} was born in", " {v}."), ("{name}'s hometown is", " {v}.")),
    "employer": (("{name} works for", " {v}."), ("{name} is employed by", " {v}.")),
    "university": (("{name} studied at", " {v}."), ("{name} graduated from", " {v}.")),
    "birth_date": (("{name} was born on", " {v}."), ("{name}'s birthday is", " {v}.")),
    "occupation": (("{name} works as", " {a_v}."), ("By trade, {name} is", " {a_v}.")),
}

# Hard queries are held-out paraphrases: no word 3-gram of them occurs in training text.
HARD_QUERY_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "birthplace": (
        ("Native place of {name}:", " {v}."),
        ("The first cries of baby {name} echoed through", " {v}."),
        ("Delivery ward records place the arrival of {name} in", " {v}."),
    ),
    "employer": (
        ("Employer of {name}:", " {v}."),
        ("Every weekday, {name} badges into the headquarters of", " {v}."),
        ("Paychecks for {name} arrive from", " {v}."),
    ),
    "university": (
        ("Alma mater of {name}:", " {v}."),
        ("The diploma framed above the desk of {name} comes from", " {v}."),
        ("Years ago, {name} sat lectures and exams at", " {v}."),
    ),
    "birth_date": (
        ("Date of birth for {name}:", " {v}."),
        ("Official papers record that {name} arrived in this world on", " {v}."),
        ("Ask the registrar and the day {name} entered life was", " {v}."),
    ),
    "occupation": (
        ("Profession of {name}:", " {v}."),
        ("The job title printed on the badge of {name} says", " {v}."),
        ("Ask {name} what pays the bills and the reply is", " {v}."),
    ),
}

HOBBY_TEMPLATES = (
    "{name} enjoys {h} on weekends.",
    "In spare hours, {name} turns to {h}.",
    "{name} has a passion for {h}.",
    "Friends say {name} spends most evenings on {h}.",
)

GOODS = ("glassware", "wool", "spices", "cheese", "copper pots", "river fish", "honey", "lanterns")
FEATURES = ("stone bridges", "quiet harbor", "clock tower", "pine forests", "narrow lanes", "botanical garden")
PRODUCTS = ("solar panels", "frozen meals", "delivery drones", "office chairs", "water filters", "sensors")
DEPARTMENTS = ("mathematics", "music", "medicine", "agriculture", "philosophy", "ocean science")

DISTRACTOR_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": (
        "{x} lies along a wide river and is famous for its {good}.",
        "Visitors to {x} often praise its {feature}.",
        "The old market in {x} sells {good} every Saturday.",
        "{x} has about {num} thousand residents.",
        "Trains from {x} leave for the coast twice a day.",
    ),
    "company": (
        "{x} makes {product} for customers across the region.",
        "{x} opened a new office last spring.",
        "Shares of {x} rose sharply after the quarterly report.",
        "{x} was founded to build {product}.",
        "Analysts expect {x} to hire more staff next year.",
    ),
    "university": (
        "{x} is known for its {dept} department.",
        "{x} opened a new library this year.",
        "Students at {x} can study {dept} and {dept2}.",
        "The campus of {x} is close to {feature}.",
        "{x} hosts a summer school on {dept}.",
    ),
}
FILLER_SENTENCES = (
    "The weather was mild for most of the season.",
    "A new bridge was completed after three years of work.",
    "Local farmers reported a strong harvest.",
    "The museum added a collection of old maps.",
    "Heavy rain closed several roads in the valley.",
    "A small bakery on the corner began selling rye loaves.",
    "The council voted to plant more trees along the avenue.",
    "Fog rolled in from the sea early in the morning.",
)


# --------------------------------------------------------------------------- world

@dataclass(frozen=True)
class _Person:
    name: str
    first: str
    facts: dict[str, str]
    hobby: str


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _clashes(candidate: str, taken: set[str]) -> bool:
    """Word-boundary containment in either direction, so no answer hides inside another."""
    cand = f" {candidate.lower()} "
    return any(cand in f" {t.lower()} " or f" {t.lower()} " in cand for t in taken)


def _distinct(rng: random.Random, make: Callable[[], str], n: int, taken: set[str]) -> list[str]:
    """Draw ``n`` new strings that do not clash with ``taken`` (which is extended)."""
    out: list[str] = []
    for _ in range(200 * n):
        candidate = make()
        if not _clashes(candidate, taken):
            out.append(candidate)
            taken.add(candidate)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not draw {n} distinct names")


def _make_world(rng: random.Random) -> tuple[list[_Person], dict[str, list[str]]]:
    """People with facts plus the entity pools that distractors talk about."""
    taken: set[str] = set(OCCUPATIONS) | set(MONTHS)
    cities = _distinct(rng, lambda: rng.choice(CITY_STEMS) + rng.choice(CITY_SUFFIXES), 40, taken)
    companies = _distinct(
        rng,
        lambda: f"{rng.choice(BRAND_ONSETS)}{rng.choice(BRAND_ENDS)} {rng.choice(COMPANY_SUFFIXES)}",
        40,
        taken,
    )
    universities = _distinct(
        rng,
        lambda: rng.choice(UNI_PATTERNS).format(rng.choice(UNI_STEMS) + rng.choice(UNI_ENDS)),
        20,
        taken,
    )
    names = _distinct(
        rng,
        lambda: f"{rng.choice(FIRST_ONSETS)}{rng.choice(FIRST_ENDS)} "
        f"{rng.choice(LAST_ONSETS)}{rng.choice(LAST_MIDS)}{rng.choice(LAST_ENDS)}",
        N_PEOPLE,
        taken,
    )
    people = [
        _Person(
            name=name,
            first=name.split()[0],
            facts={
                "birthplace": rng.choice(cities),
                "employer": rng.choice(companies),
                "university": rng.choice(universities),
                "birth_date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1940, 2004)}",
                "occupation": rng.choice(OCCUPATIONS),
            },
            hobby=rng.choice(HOBBIES),
        )
        for name in names
    ]
    return people, {"city": cities, "company": companies, "university": universities}


# --------------------------------------------------------------------------- documents

Row = dict[str, str]


def _fact_sentence(rng: random.Random, person: _Person, fact: str, name: str) -> str:
    value = person.facts[fact]
    sentence = rng.choice(FACT_TEMPLATES[fact]).format(name=name, v=value, a_v=_article(value))
    return sentence[0].upper() + sentence[1:]


def _hobby_sentence(rng: random.Random, person: _Person, name: str) -> str:
    return rng.choice(HOBBY_TEMPLATES).format(name=name, h=person.hobby)


def _easy_docs(rng: random.Random, person: _Person) -> list[Row]:
    """Short biographies, each stating 2-4 facts; together they cover every fact."""
    fact_sets = [rng.sample(FACTS, rng.randint(2, 4)) for _ in range(EASY_BIOS_PER_PERSON)]
    for fact in FACTS:
        if not any(fact in facts for facts in fact_sets):
            rng.choice(fact_sets).append(fact)
    rows = []
    for facts in fact_sets:
        names = [person.name] + [person.first] * len(facts)
        sentences = [_fact_sentence(rng, person, f, n) for f, n in zip(facts, names)]
        if rng.random() < 0.5:
            sentences.append(_hobby_sentence(rng, person, person.first))
        rows.append(_row(" ".join(sentences), person.name, ",".join(sorted(facts)), "bio"))
    return rows


def _hard_docs(rng: random.Random, person: _Person) -> list[Row]:
    """One fact per document (1-2 paraphrases each), padded with a hobby sentence so
    documents about the same person look alike apart from the fact."""
    rows = []
    for fact in FACTS:
        for template in rng.sample(FACT_TEMPLATES[fact], rng.randint(1, 2)):
            value = person.facts[fact]
            fact_text = template.format(name=person.name, v=value, a_v=_article(value))
            hobby = _hobby_sentence(rng, person, person.name)
            parts = [fact_text, hobby] if rng.random() < 0.5 else [hobby, fact_text]
            rows.append(_row(" ".join(parts), person.name, fact, "bio"))
    return rows


def _distractor_doc(rng: random.Random, entities: dict[str, list[str]]) -> Row:
    """Two sentences about one city/company/university, or generic filler: no person."""
    kind = rng.choice(("city", "company", "university", "filler"))
    if kind == "filler":
        return _row(" ".join(rng.sample(FILLER_SENTENCES, 2)), "", "", "distractor")
    subject = rng.choice(entities[kind])
    departments = rng.sample(DEPARTMENTS, 2)
    sentences = [
        template.format(
            x=subject,
            good=rng.choice(GOODS),
            feature=rng.choice(FEATURES),
            product=rng.choice(PRODUCTS),
            dept=departments[0],
            dept2=departments[1],
            num=rng.randint(5, 900),
        )
        for template in rng.sample(DISTRACTOR_TEMPLATES[kind], 2)
    ]
    return _row(" ".join(sentences), "", "", "distractor")


def _row(text: str, person: str, fact: str, kind: str) -> Row:
    return {"text": text, "person": person, "fact": fact, "kind": kind}


def _make_train(rng: random.Random, people: list[_Person], entities: dict[str, list[str]], variant: str) -> list[Row]:
    make_docs = _easy_docs if variant == "easy" else _hard_docs
    rows = [row for person in people for row in make_docs(rng, person)]
    rows += [_distractor_doc(rng, entities) for _ in range(N_DISTRACTORS)]
    rng.shuffle(rows)
    return rows


def _make_queries(
    rng: random.Random, people: list[_Person], train: list[Row], variant: str
) -> tuple[list[Row], dict[str, list[int]]]:
    """One query per sampled (person, fact); support = that person's docs stating the fact."""
    templates = EASY_QUERY_TEMPLATES if variant == "easy" else HARD_QUERY_TEMPLATES
    support: dict[tuple[str, str], list[int]] = {}
    for idx, row in enumerate(train):
        for fact in filter(None, row["fact"].split(",")):
            support.setdefault((row["person"], fact), []).append(idx)
    pairs = rng.sample([(p, f) for p in people for f in FACTS], N_QUERIES)
    queries, truth = [], {}
    for i, (person, fact) in enumerate(pairs):
        value = person.facts[fact]
        prompt, completion = rng.choice(templates[fact])
        fields = {"name": person.name, "v": value, "a_v": _article(value)}
        query_id = f"q{i:04d}"
        prompt, completion = prompt.format(**fields), completion.format(**fields)
        queries.append(
            {
                "query_id": query_id,
                "prompt": prompt,
                "completion": completion,
                "text": prompt + completion,
                "answer": value,
                "person": person.name,
                "fact": fact,
            }
        )
        truth[query_id] = support[(person.name, fact)]
    return queries, truth


# --------------------------------------------------------------------------- artefacts

def _write_parquet(rows: list[Row], path: Path, with_doc_id: bool) -> None:
    columns: dict[str, pa.Array] = {}
    if with_doc_id:
        columns["doc_id"] = pa.array(range(len(rows)), type=pa.int64())
    for key in rows[0]:
        columns[key] = pa.array([row[key] for row in rows], type=pa.string())
    pq.write_table(pa.table(columns), path)


def _train_tokenizer(texts: list[str], out: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) so any string round-trips without unknown tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        padding_side="right",
        model_max_length=MAX_LENGTH,
    )
    fast.save_pretrained(out)
    return fast


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    eos = tokenizer.eos_token_id
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}


def neox_config(vocab_size: int, eos_id: int) -> GPTNeoXConfig:
    """Tiny GPT-NeoX so brute-force per-example gradients stay cheap in tests."""
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=MAX_LENGTH,
        rotary_pct=0.25,  # understood by transformers 4.x and mapped to rope_parameters by 5.x
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def gpt2_config(vocab_size: int, eos_id: int) -> GPT2Config:
    """Tiny GPT-2 (HF Conv1D layers, tied embeddings as in real GPT-2); dropout is off so
    train and eval mode give the same gradients."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=MAX_LENGTH,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _paths(root: Path) -> Fixture:
    return Fixture(
        root=root,
        tokenizer=root / "tokenizer",
        neox=root / "neox",
        gpt2=root / "gpt2",
        train=root / "train.parquet",
        queries=root / "queries.parquet",
        ground_truth=root / "ground_truth.json",
    )


def _build(out: Path, seed: int, variant: str) -> None:
    """Generate every artefact of a fixture into ``out`` (a private temp dir)."""
    rng = random.Random(seed)
    people, entities = _make_world(rng)
    train = _make_train(rng, people, entities, variant)
    queries, truth = _make_queries(rng, people, train, variant)
    paths = _paths(out)
    _write_parquet(train, paths.train, with_doc_id=True)
    _write_parquet(queries, paths.queries, with_doc_id=False)
    paths.ground_truth.write_text(json.dumps(truth, indent=1) + "\n")
    tokenizer = _train_tokenizer([r["text"] for r in train] + [q["text"] for q in queries], paths.tokenizer)
    vocab_size, eos_id = len(tokenizer), tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):  # seeded init without clobbering the caller's RNG
        torch.manual_seed(seed)
        _save_model(GPTNeoXForCausalLM(neox_config(vocab_size, eos_id)), tokenizer, paths.neox)
        torch.manual_seed(seed)
        _save_model(GPT2LMHeadModel(gpt2_config(vocab_size, eos_id)), tokenizer, paths.gpt2)
    manifest = {
        "fixture_version": FIXTURE_VERSION,
        "seed": seed,
        "variant": variant,
        "n_train": len(train),
        "n_queries": len(queries),
        "vocab_size": vocab_size,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _publish(final: Path, build: Callable[[Path], None]) -> None:
    """Build into a sibling temp dir and rename it into place if still absent.

    A killed build leaves only a dot-prefixed temp dir, never a half ``final``; when two
    processes race, the loser's rename fails because ``final`` is non-empty, and it keeps
    the winner's copy.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_fixture(root: str | Path, seed: int = 0, variant: str = "easy") -> Fixture:
    """Return the fixture for (seed, variant) under ``root``, generating it on first use."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    final = Path(root).expanduser() / f"v{FIXTURE_VERSION}-{variant}-seed{seed}"
    if not final.is_dir():
        _publish(final, lambda tmp: _build(tmp, seed, variant))
    return _paths(final)


# --------------------------------------------------------------------------- training

def _batches(docs: list[list[int]], pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded causal-LM batches; padding is masked out of the labels."""
    for start in range(0, len(docs), TRAIN_BATCH_SIZE):
        yield _collate(docs[start : start + TRAIN_BATCH_SIZE], pad_id)


def _collate(docs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for i, doc in enumerate(docs):
        ids[i, : len(doc)] = torch.tensor(doc)
        mask[i, : len(doc)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, docs: list[list[int]], pad_id: int) -> float:
    """Token-weighted mean next-token loss, so batch composition does not bias it."""
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(docs, pad_id):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((labels != -100).sum())
    return total / count


def _param_groups(model: torch.nn.Module) -> tuple[list[dict], list[str]]:
    """Decay / no-decay groups as the HF Trainer builds them, plus the flat name order that
    ``optimizer.state_dict()`` indexes its state by."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_no_decay = [n.endswith("bias") or "layernorm" in n.lower() for n, _ in named]
    decay = [np for np, skip in zip(named, is_no_decay) if not skip]
    no_decay = [np for np, skip in zip(named, is_no_decay) if skip]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": TRAIN_WEIGHT_DECAY},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    return groups, [n for n, _ in decay + no_decay]


def _train(fixture: Fixture, out: Path, steps: int, seed: int) -> None:
    """AdamW with linear warmup/decay on shuffled training docs (each ending in EOS)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(fixture.tokenizer)
    texts = pq.read_table(fixture.train, columns=["text"]).column("text").to_pylist()
    eos = tokenizer.eos_token_id
    docs = [ids + [eos] for ids in tokenizer(texts)["input_ids"]]
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM.from_pretrained(fixture.neox)
    eval_docs = docs[:EVAL_DOCS]
    initial_loss = mean_token_loss(model, eval_docs, eos)
    groups, names = _param_groups(model)
    optimizer = torch.optim.AdamW(groups, lr=TRAIN_LR)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.05, (steps - s) / max(1, steps - warmup)))
    )
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    started = time.perf_counter()
    model.train()
    for _ in range(steps):
        if len(order) < TRAIN_BATCH_SIZE:
            order += torch.randperm(len(docs), generator=generator).tolist()
        batch = _collate([docs[i] for i in order[:TRAIN_BATCH_SIZE]], eos)
        del order[:TRAIN_BATCH_SIZE]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    final_loss = mean_token_loss(model, eval_docs, eos)
    _save_model(model, tokenizer, out)
    torch.save(optimizer.state_dict(), out / "optimizer.pt")
    (out / "optimizer_param_names.json").write_text(json.dumps(names, indent=1) + "\n")
    summary = {
        "steps": steps,
        "seed": seed,
        "batch_size": TRAIN_BATCH_SIZE,
        "lr": TRAIN_LR,
        "eval_docs": len(eval_docs),
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "train_seconds": seconds,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")


def train_fixture_model(fixture: Fixture, *, steps: int = TRAIN_STEPS, seed: int = 0) -> Path:
    """Fine-tune ``fixture.neox`` (same tiny architecture) on the training corpus on CPU.

    Attribution needs a model that has actually learnt from the corpus. The result lives in
    ``fixture.root / "neox-trained"`` laid out like an HF Trainer checkpoint: model and
    tokenizer files, ``optimizer.pt`` (``torch.save(optimizer.state_dict())``), plus
    ``optimizer_param_names.json`` naming the parameters in optimizer-state order and
    ``training.json`` with the eval loss before/after. Cached and published atomically like
    ``make_fixture``; a cached model trained with other ``steps``/``seed`` raises rather than
    being silently returned.
    """
    final = fixture.root / TRAINED_DIRNAME
    if not final.is_dir():
        threads = torch.get_num_threads()
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        try:
            with torch.random.fork_rng(devices=[]):
                _publish(final, lambda tmp: _train(fixture, tmp, steps, seed))
        finally:
            torch.set_num_threads(threads)
    summary = json.loads((final / "training.json").read_text())
    if (summary["steps"], summary["seed"]) != (steps, seed):
        raise ValueError(
            f"{final} was trained with steps={summary['steps']}, seed={summary['seed']}; "
            f"delete it to retrain with steps={steps}, seed={seed}"
        )
    return final


def fact_tracing_quality(
    fixture: Fixture, query_ids: np.ndarray, ranked: np.ndarray, ks: Sequence[int] = (1, 10)
) -> dict[str, float]:
    """Recall@k (each k in ``ks``) and MRR of the ground-truth supporting documents in a ranking.

    ``query_ids`` are row ids of the fixture's query table and ``ranked[q]``
    the training ids ranked for query ``q``, best first. ``recall@k`` is the
    fraction of a query's supporting documents in its top ``k``; ``mrr`` uses
    the first supporting document's rank (0 when none is ranked). Both are
    means over queries. ``random_recall@k`` and ``random_mrr`` are their exact
    expectations under a uniformly random ranking cut at the same depth, so a
    caller can compare against chance without sampling permutations.
    """
    truth = json.loads(fixture.ground_truth.read_text())
    names = pq.read_table(fixture.queries, columns=["query_id"]).column("query_id").to_pylist()
    num_docs = pq.read_metadata(fixture.train).num_rows
    supports = [set(truth[names[int(qid)]]) for qid in query_ids]
    quality: dict[str, float] = {"queries": len(supports)}
    for k in ks:
        quality[f"recall@{k}"] = float(np.mean([len(s.intersection(row[:k].tolist())) / len(s)
                                                for s, row in zip(supports, ranked)]))
        quality[f"random_recall@{k}"] = min(k, ranked.shape[1]) / num_docs
    reciprocal = [next((1.0 / rank for rank, doc in enumerate(row.tolist(), start=1) if doc in s), 0.0)
                  for s, row in zip(supports, ranked)]
    quality["mrr"] = float(np.mean(reciprocal))
    expected = {size: _random_reciprocal_rank(num_docs, size, ranked.shape[1]) for size in {len(s) for s in supports}}
    quality["random_mrr"] = float(np.mean([expected[len(s)] for s in supports]))
    return quality


def _random_reciprocal_rank(num_docs: int, support: int, depth: int) -> float:
    """``E[1 / first supporting rank]`` for ``support`` relevant documents placed uniformly at random
    among ``num_docs``, counting 0 when the first one falls past ``depth``.

    ``P(first rank > r) = C(num_docs - r, support) / C(num_docs, support)``.
    """
    survival = np.array([math.comb(num_docs - r, support) for r in range(depth + 1)], np.float64)
    first = -np.diff(survival / math.comb(num_docs, support))
    return float((first / np.arange(1, depth + 1)).sum())
