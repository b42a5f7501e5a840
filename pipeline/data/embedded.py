"""The embedded default dataset: four small synthetic instruction tasks, made from a seed.

The default experiment must run offline on a laptop CPU, so its data cannot come from
the network. Every example here is built from templates and word tables, which gives
two things real data would not: references that are *exactly* derivable from the input
(so exact match and ROUGE measure learning, not annotator noise), and short sequences
(so a 135M model trains in minutes).

Each task draws from its own ``random.Random`` seeded by ``(seed, task)``: the global
random state is never touched, tasks do not perturb one another, and asking for more
examples only appends (``generate(s, 100)`` is a per-task prefix of ``generate(s, 300)``).
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable

from pipeline.data.schema import Example

TASKS: dict[str, str] = {
    "topic": "classification",
    "qa": "short_answer",
    "past_tense": "free_text",
    "summary": "free_text",
}

# Paraphrases keep the model from keying on one exact string; the rng picks one per example.
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "topic": (
        "Classify the topic of the sentence. Answer with one word: sports, business, science or politics.",
        "What is this sentence about? Reply with one word: sports, business, science or politics.",
    ),
    "qa": (
        "Answer the question using a short phrase copied from the passage.",
        "Read the passage and answer the question with the exact words from the text.",
    ),
    "past_tense": (
        "Rewrite the sentence in the past tense.",
        "Change the verb of this sentence to the past tense and repeat the sentence.",
    ),
    "summary": (
        "Summarize the note in one sentence.",
        "Write a one-sentence summary of the note.",
    ),
}

LABELS = ("sports", "business", "science", "politics")

# --- shared word tables -----------------------------------------------------------------
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
CITIES = ("Lisbon", "Oslo", "Denver", "Nairobi", "Osaka", "Porto", "Quebec", "Perth", "Leeds",
          "Austin", "Bergen", "Tucson", "Cape Town", "San Diego", "New Orleans", "Glasgow")
NAMES = ("Alice", "Bruno", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Keiko", "Liam", "Maya", "Nadia", "Oscar", "Priya", "Rosa", "Samir", "Tessa", "Victor")

# --- topic: per-label subjects and predicates; any subject fits any predicate of its label --
TOPIC_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sports": (
        ("The home team", "The veteran striker", "The national squad", "The young goalkeeper",
         "The tennis champion", "The cycling team"),
        ("won the cup final", "lost the semi-final", "scored twice in the derby",
         "set a new league record", "qualified for the playoffs", "beat the defending champions",
         "was knocked out of the tournament", "finished the marathon in first place"),
    ),
    "business": (
        ("The retail chain", "The car maker", "A regional bank", "The software firm",
         "The airline", "The coffee company"),
        ("reported record quarterly profits", "announced a merger with a rival",
         "raised its sales forecast", "laid off two hundred workers", "opened three new stores",
         "saw its shares fall sharply", "cut prices to win customers", "hired a new chief executive"),
    ),
    "science": (
        ("Researchers", "A team of scientists", "University biologists", "Astronomers",
         "Chemists at the national lab", "Marine researchers"),
        ("discovered a new species of frog", "observed a distant exploding star",
         "published a study on glacier melting", "sequenced the genome of a rare plant",
         "measured record levels of ocean heat", "built a more efficient solar cell",
         "found fossils of an early mammal", "tested a new vaccine in mice"),
    ),
    "politics": (
        ("The prime minister", "Opposition lawmakers", "The city council", "The foreign minister",
         "The governor", "Parliament"),
        ("passed a new election law", "called for an early vote", "vetoed the budget proposal",
         "won a confidence vote", "announced a cabinet reshuffle", "signed a border treaty",
         "debated a bill on voting rights", "launched a campaign for re-election"),
    ),
}
WHEN = tuple(f"on {d}" for d in DAYS) + ("yesterday", "last night", "this week", "this morning")

# --- qa: facts about a made-up person; pet names never collide with people or cities ------
SURNAMES = ("Novak", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Brennan", "Kowalski",
            "Haddad", "Petrov", "Alvarez", "Nakamura", "Fischer", "Osei", "Larsen")
JOBS = ("nurse", "engineer", "baker", "pilot", "architect", "teacher", "bus driver", "dentist",
        "librarian", "electrician", "gardener", "journalist", "chef", "accountant", "photographer")
PETS = ("dog", "cat", "parrot", "rabbit", "turtle", "hamster", "goat", "iguana")
PET_NAMES = ("Biscuit", "Pepper", "Noodle", "Ziggy", "Mango", "Waffles", "Pickles", "Luna",
             "Rocket", "Toffee", "Bubbles", "Marble", "Sprout", "Nugget", "Clover")

# --- past_tense: (present 3rd person singular, past, complements) ------------------------
# Irregular pasts are listed explicitly rather than derived, so the mapping is a lookup.
VERBS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("walks", "walked", ("to the station", "along the river", "to the market")),
    ("cleans", "cleaned", ("the kitchen", "the old bicycle", "the windows")),
    ("paints", "painted", ("the fence", "a small portrait", "the garden shed")),
    ("visits", "visited", ("the museum", "an old friend", "the library")),
    ("carries", "carried", ("a heavy box", "the groceries", "a blue umbrella")),
    ("watches", "watched", ("the news", "a football match", "the birds")),
    ("cooks", "cooked", ("a large dinner", "rice and beans", "soup for the family")),
    ("studies", "studied", ("French grammar", "the map", "old newspapers")),
    ("fixes", "fixed", ("the radio", "a broken chair", "the leaking tap")),
    ("plays", "played", ("the piano", "chess in the park", "cards with neighbours")),
    ("goes", "went", ("to the gym", "to the beach", "to the post office")),
    ("writes", "wrote", ("a letter", "a short poem", "notes in a diary")),
    ("eats", "ate", ("an apple", "lunch at the cafe", "a sandwich")),
    ("buys", "bought", ("fresh bread", "a newspaper", "flowers for the table")),
    ("takes", "took", ("the early train", "the dog outside", "a long nap")),
    ("sees", "saw", ("the doctor", "a film at the cinema", "the sunrise")),
    ("drinks", "drank", ("a cup of tea", "cold water", "strong coffee")),
    ("makes", "made", ("a cake", "fresh pasta", "a wooden toy")),
    ("brings", "brought", ("a packed lunch", "cookies to the office", "a friend along")),
    ("teaches", "taught", ("a math class", "the children to swim", "a cooking lesson")),
    ("sings", "sang", ("in the choir", "an old song", "at the village hall")),
    ("drives", "drove", ("to the coast", "a red truck", "the kids to school")),
    ("sells", "sold", ("vegetables at the market", "old books", "handmade candles")),
    ("rides", "rode", ("a horse", "the bus to town", "a bicycle to work")),
    ("reads", "read", ("the morning paper", "a mystery novel", "stories to the children")),
    ("leaves", "left", ("the house early", "the office at six", "a note on the door")),
)
SUBJECTS = ("The engineer", "My sister", "Our neighbour", "The old farmer", "The teacher",
            "A young student", "The pilot", "My uncle", "The baker", "The nurse", "Her brother",
            "The mayor", "The tourist", "His grandmother")
ADVERBIALS = ("every morning", "on Sundays", "after work", "before breakfast", "in the evening",
              "twice a week", "during the holidays", "at noon", "every day", "on weekends",
              "once a month", "after lunch")

# --- summary: notes whose one-line summary is a fixed template over the note's slots ------
TOPICS = ("budget", "hiring plan", "marketing campaign", "product launch", "office move",
          "training schedule", "website redesign", "annual report", "supplier contract")
ROOMS = ("Room 4", "the main hall", "the library", "the small office", "the cafeteria")
ITEMS = ("notebooks", "desk lamps", "office chairs", "coffee mugs", "monitors", "printer cartridges",
         "whiteboards", "keyboards")
PAYMENTS = ("credit card", "bank transfer", "cash on delivery")
EVENTS = ("charity dinner", "book fair", "science workshop", "jazz concert", "school reunion",
          "photo exhibition", "chess tournament", "food festival")

Made = tuple[str, str, dict[str, Any]]  # (input, output, meta)


def _article(word: str) -> str:
    """'a' or 'an' by the first letter; enough for the words in these tables."""
    return "an" if word[0].lower() in "aeiou" else "a"


def _regular_past(present: str) -> str:
    """The past form the '-ed' spelling rules would give; a table entry that differs is irregular."""
    if present.endswith("ies"):
        return present[:-3] + "ied"
    if present.endswith(("ches", "shes", "xes")):
        return present[:-2] + "ed"
    stem = present[:-1]
    return stem + ("d" if stem.endswith("e") else "ed")


def _topic(rng: random.Random, label: str) -> Made:
    """One news-like sentence whose subject and predicate both belong to ``label``."""
    subjects, predicates = TOPIC_WORDS[label]
    where = rng.choice(("",) + CITIES)  # an optional place widens the space of inputs
    place = f" in {where}" if where else ""
    text = f"{rng.choice(subjects)} {rng.choice(predicates)}{place} {rng.choice(WHEN)}."
    return text, label, {"label": label}


def _qa(rng: random.Random) -> Made:
    """A three-sentence biography and a question whose answer is one span of it."""
    first, last, pet, pet_name, job = (rng.choice(t) for t in (NAMES, SURNAMES, PETS, PET_NAMES, JOBS))
    city, city2 = rng.sample(CITIES, 2)  # distinct, so "where born" has one answer
    year = rng.randint(1950, 1995)
    year2 = year + rng.randint(18, 30)  # strictly later, so the two years never coincide
    passage = (f"{first} {last} was born in {city} in {year}. "
               f"{first} works as {_article(job)} {job} "
               f"and has {_article(pet)} {pet} called {pet_name}. "
               f"In {year2}, {first} moved to {city2}.")
    questions = {
        "birth_city": (f"Where was {first} born?", city),
        "birth_year": (f"In what year was {first} born?", str(year)),
        "job": (f"What is {first}'s job?", job),
        "pet": (f"What kind of pet does {first} have?", pet),
        "pet_name": (f"What is the name of {first}'s {pet}?", pet_name),
        "new_city": (f"Which city did {first} move to?", city2),
        "move_year": (f"In what year did {first} move to {city2}?", str(year2)),
    }
    field = rng.choice(sorted(questions))
    question, answer = questions[field]
    return f"{passage}\nQuestion: {question}", answer, {"field": field}


def _past_tense(rng: random.Random) -> Made:
    """A present-tense habit sentence and the same sentence with only the verb changed."""
    present, past, complements = rng.choice(VERBS)
    subject, rest = rng.choice(SUBJECTS), f"{rng.choice(complements)} {rng.choice(ADVERBIALS)}."
    meta = {"verb": present, "past": past, "irregular": past != _regular_past(present)}
    return f"{subject} {present} {rest}", f"{subject} {past} {rest}", meta


def _summary(rng: random.Random) -> Made:
    """A note with distractor details, and a summary that keeps only the key slots."""
    kind = rng.choice(("meeting", "order", "event"))
    a, b = rng.sample(NAMES, 2)
    day, city = rng.choice(DAYS), rng.choice(CITIES)
    if kind == "meeting":
        topic = rng.choice(TOPICS)
        note = (f"{a} and {b} met on {day} in {rng.choice(ROOMS)}. They talked about the {topic} "
                f"for {rng.choice((20, 30, 45, 60, 90))} minutes.")
        summary = f"{a} met {b} on {day} to discuss the {topic}."
    elif kind == "order":
        count, items = rng.randint(2, 40), rng.choice(ITEMS)
        note = (f"Order {rng.randint(1000, 9999)} was placed by {a} on {day}. It contains {count} "
                f"{items} and ships to {city}. Payment was made by {rng.choice(PAYMENTS)}.")
        summary = f"{a} ordered {count} {items} for delivery to {city}."
    else:
        event, guests = rng.choice(EVENTS), rng.choice((40, 80, 120, 200, 350))
        note = (f"The {event} will take place in {city} on {day}. {a} is organizing it "
                f"with help from {b} and expects {guests} guests.")
        summary = f"{a} is organizing the {event} in {city} on {day}."
    return note, summary, {"kind": kind}


MAKERS: dict[str, Callable[[random.Random], Made]] = {
    "qa": _qa, "past_tense": _past_tense, "summary": _summary,
}


def generate(seed: int, n_per_task: int) -> list[Example]:
    """Build ``n_per_task`` examples for each task in :data:`TASKS`, in that task order.

    Deterministic: the same ``(seed, n_per_task)`` gives an identical list. Topic labels
    come in shuffled blocks of four, so the classes stay balanced (within one) for any
    ``n_per_task`` while the label order is still random.
    """
    if n_per_task < 0:
        raise ValueError(f"n_per_task must be >= 0, got {n_per_task}")
    examples: list[Example] = []
    for task, task_type in TASKS.items():
        rng = random.Random(f"{seed}:{task}")  # str seeds hash with sha512: stable across runs
        block: list[str] = []
        for i in range(n_per_task):
            if task == "topic":
                if not block:
                    block = rng.sample(LABELS, len(LABELS))
                text, output, meta = _topic(rng, block.pop())
            else:
                text, output, meta = MAKERS[task](rng)
            examples.append(Example(id=f"{task}-{i:04d}", task=task, task_type=task_type,
                                    instruction=rng.choice(INSTRUCTIONS[task]), input=text,
                                    output=output, source="embedded", meta=meta))
    return examples


# Preference pairs for the align stage (DPO): the chosen answer is the reference; the rejected one
# is a plausible wrong answer of the kind a half-trained model gives, so that a preference is
# learnable and the held-out preference metric measures something.
_QA_SPANS = re.compile(r"was born in (?P<birth_city>[^.]+) in (?P<birth_year>\d{4})\. \S+ works as an? "
                       r"(?P<job>[^.]+?) and has an? (?P<pet>[^.]+?) called (?P<pet_name>[^.]+)\. "
                       r"In (?P<move_year>\d{4}), \S+ moved to (?P<new_city>[^.]+)\.")
# The sentence of the passage each answer comes from: a wrong span is taken from another sentence.
_QA_SENTENCE = {"birth_city": 0, "birth_year": 0, "job": 1, "pet": 1, "pet_name": 1, "new_city": 2, "move_year": 2}


def rejected(example: Example, seed: int) -> str | None:
    """A deterministic wrong answer to one embedded example, or None when it is not one of ours.

    topic: another label; qa: a span of another sentence of the passage; past_tense: the sentence
    left in the present tense; summary: the summary of another, unrelated note. Drawn from a
    ``random.Random`` seeded by ``(seed, id)``, so a pair does not depend on the others.
    """
    if example.source != "embedded" or example.task not in TASKS:
        return None
    rng = random.Random(f"{seed}:{example.id}:rejected")
    if example.task == "topic":
        return rng.choice([label for label in LABELS if label != example.output])
    if example.task == "qa":
        found = _QA_SPANS.search(example.input)
        field = example.meta.get("field")
        if found is None or field not in _QA_SENTENCE:
            return None
        others = sorted(k for k, v in _QA_SENTENCE.items() if v != _QA_SENTENCE[field])
        return next((found[k] for k in rng.sample(others, len(others)) if found[k] != example.output), None)
    if example.task == "past_tense":
        return example.input if example.input != example.output else None
    for _ in range(8):  # summary: a different note's summary (the first draw almost always differs)
        _, other, _ = _summary(rng)
        if other != example.output:
            return other
    return None
