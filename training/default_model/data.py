"""Synthetic multi-turn chats for the default model: state facts, chat about other things, ask for the facts.

A conversation states one to three facts about the user (name, city, pet, favourite colour, a number, age,
birthday), in one of many phrasings, with small talk before, between and after; then it asks about them. The
assistant acknowledges a fact by repeating it ("Nice to meet you, Marcus.", "Got it: Lisbon."), answers small
talk with small talk ("Do you like tea?" -> "Yes, I like tea."), and answers a question about a fact with the
fact as the user wrote it and a full stop ("Marcus.", "Lisbon.", "17.", "A dog."). A question about a fact that
was never stated gets "You have not told me.".

Every template and word list has a training part and a held-out part (`split="train"` / `split="heldout"`):
held-out conversations use only phrasings and words that no training conversation contains, so their recall
measures copying from the conversation, not memory. Training values are also drawn as random letter strings
and random numbers, so the answer can only be found in the conversation. The phrasings are in phrasings.py, the
word lists in vocab.py.
"""
from __future__ import annotations

import dataclasses
import random
import string

from training.default_model import vocab as V
from training.default_model.phrasings import (FILLERS, KINDS, QUESTION_PREFIXES, QUESTION_TAILS, SMALL_TALK,
                                              STATED_KINDS, STATEMENT_PREFIXES, STATEMENT_SUFFIXES, SYSTEM_PROMPTS)

NOT_TOLD = "You have not told me."


def _lower_set(*sets) -> set[str]:
    return {w.lower() for s in sets for w in s}


HELDOUT_WORDS = _lower_set(V.HELDOUT_NAMES, V.HELDOUT_CITIES, V.HELDOUT_PET_NAMES, V.HELDOUT_SPECIES,
                           V.HELDOUT_COLOURS, V.HELDOUT_THINGS)


def _train_only(words) -> list[str]:
    return [w for w in words if w.lower() not in HELDOUT_WORDS]


WORDS = {
    "train": {"name": _train_only(V.NAMES), "city": _train_only(V.CITIES), "pet": _train_only(V.PET_NAMES),
              "species": _train_only(V.SPECIES), "colour": _train_only(V.COLOURS),
              "thing": _train_only(V.THINGS)},
    "heldout": {"name": sorted(V.HELDOUT_NAMES), "city": sorted(V.HELDOUT_CITIES),
                "pet": sorted(V.HELDOUT_PET_NAMES), "species": sorted(V.HELDOUT_SPECIES),
                "colour": sorted(V.HELDOUT_COLOURS), "thing": sorted(V.HELDOUT_THINGS)},
}


# ------------------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------------------

_CONS, _VOWELS = "bcdfghjklmnprstvwxyz", "aeiou"


def random_word(rng: random.Random, lo: int = 2, hi: int = 13) -> str:
    """A capitalised made-up word: pronounceable syllables, or arbitrary letters (so any spelling is copied)."""
    n = rng.randint(lo, hi)
    if rng.random() < 0.5:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
    else:
        w = ""
        while len(w) < n:  # syllables: an onset (90%), a vowel, a coda (30%)
            onset, has_onset = rng.choice(_CONS), rng.random() < 0.9
            vowel, coda, has_coda = rng.choice(_VOWELS), rng.choice(_CONS), rng.random() < 0.3
            w += onset * has_onset + vowel + coda * has_coda
        w = w[:n]
    w = w.capitalize()
    return w if w.lower() not in HELDOUT_WORDS else random_word(rng, lo, hi)


def random_number(rng: random.Random) -> str:
    digits = rng.randint(1, 4)
    return str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1))


def random_date(rng: random.Random) -> str:
    day, month = rng.randint(1, 31), rng.choice(V.MONTHS)
    if rng.random() < 0.5:
        return f"{day} {month}"
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{month} {day}{suffix}" if rng.random() < 0.5 else f"{month} {day}"


TWO_WORDS = {"city": 0.3, "colour": 0.25}  # share of made-up values of two words ("Port Elmo", "dusty rose")


def _word_or_random(rng: random.Random, split: str, key: str, random_share: float, **kw) -> str:
    if split == "train" and rng.random() < random_share:
        if rng.random() < TWO_WORDS.get(key, 0.1):
            return f"{random_word(rng, 3, 7)} {random_word(rng, 3, 8)}"
        return random_word(rng, **kw)
    return rng.choice(WORDS[split][key])


def draw_value(rng: random.Random, kind: str, split: str) -> str:
    """The value of a fact of this kind (species: drawn with the pet)."""
    if kind in ("name", "city", "pet"):
        return _word_or_random(rng, split, kind, 0.5)
    if kind in ("species", "colour"):  # made-up ones too, so that unseen ones are copied, not recalled
        return _word_or_random(rng, split, kind, 0.3, lo=3, hi=10).lower()
    if kind == "number":
        return random_number(rng)
    if kind == "age":
        return str(rng.randint(2, 99))
    return random_date(rng)


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# ------------------------------------------------------------------------------------------------------------
# Turns
# ------------------------------------------------------------------------------------------------------------


def _fill(template: str, facts: dict[str, str]) -> str:
    s = facts.get("species", "")
    return template.format(v=facts.get("_v", ""), s=s, a=article(s) if s else "")


def _lead_in(text: str, prefix: str, keep_case: bool) -> str:
    return prefix + (text if keep_case else text[0].lower() + text[1:])


def _casual_end(text: str, rng: random.Random) -> str:
    """Users often drop the final full stop or question mark, or end with '!'."""
    r = rng.random()
    if r < 0.2:
        return text.rstrip(".?")
    if r < 0.3 and text.endswith("."):
        return text[:-1] + "!"
    return text


def _keeps_case(text: str, value: str) -> bool:
    return text.startswith(("I ", "I'", value))


def _with_filler(template: str, rng: random.Random, split: str, p: float = 0.3) -> str:
    """In training, sometimes a filler at a random word boundary before the value (or the final punctuation)."""
    if split != "train" or rng.random() >= p:
        return template
    end = template.find("{v}") if "{v}" in template else len(template.rstrip(".?!"))
    spaces = [i for i in range(end) if template[i] == " "]
    if not spaces:
        return template
    i = rng.choice(spaces)
    return template[:i] + " " + rng.choice(FILLERS) + template[i:]


def statement(rng: random.Random, kind: str, facts: dict[str, str], split: str) -> tuple[str, str]:
    """(user message stating facts[kind], the assistant's acknowledgement)."""
    template = _with_filler(rng.choice(KINDS[kind].statements[split]), rng, split)
    value = facts[kind]
    text = _fill(template, {**facts, "_v": value})
    if rng.random() < 0.2:
        text = _lead_in(text, rng.choice(STATEMENT_PREFIXES), _keeps_case(text, value))
    if rng.random() < 0.15:
        text += rng.choice(STATEMENT_SUFFIXES)
    return _casual_end(text, rng), KINDS[kind].ack.format(v=value)


def question(rng: random.Random, kind: str, facts: dict[str, str], split: str) -> tuple[str, str]:
    """(user question about `kind`, the answer: the fact, or NOT_TOLD when it was never stated)."""
    if kind == "pet" and "species" not in facts:  # asking about a pet never mentioned: no species to name
        without_species = [q for q in KINDS["pet"].questions[split] if "{s}" not in q]
        template = rng.choice(without_species or ["What is my pet called?"])
    else:
        template = rng.choice(KINDS[kind].questions[split])
    text = _fill(_with_filler(template, rng, split), facts)
    if text.endswith("?") and rng.random() < 0.2:
        text = text[:-1] + rng.choice(QUESTION_TAILS) + "?"
    if rng.random() < 0.15:
        text = _lead_in(text, rng.choice(QUESTION_PREFIXES), text.startswith("I "))
    if rng.random() < 0.15:
        text = text.rstrip("?")
    if split == "train" and rng.random() < 0.1:
        text = text.lower()
    if kind not in facts:
        return text, NOT_TOLD
    value = facts[kind]
    answer = article(value).capitalize() if kind == "species" else value
    return text, answer + "."


def small_talk(rng: random.Random, split: str) -> tuple[str, str | None]:
    """(user message, expected answer): fixed chit-chat or a template with a fresh word. Held-out small talk
    mixes unseen chit-chat (expected answer None: any answer that is not a stated fact) with templates over
    unseen words."""
    r = rng.random()
    if r < 0.2:
        thing = _word_or_random(rng, split, "thing", 0.3).lower()
        return f"Do you like {thing}?", f"Yes, I like {thing}."
    if r < 0.3:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return rng.choice([f"What is {a}+{b}?", f"What is {a} plus {b}?"]), str(a + b)
    if r < 0.38:
        return f"Have you been to {rng.choice(WORDS[split]['city'])}?", "No, I have not."
    if r < 0.44:
        friend = _word_or_random(rng, split, "name", 0.3)
        return f"My friend {friend} says hi.", f"Hello to {friend}!"
    return rng.choice(SMALL_TALK[split])


# ------------------------------------------------------------------------------------------------------------
# Conversations
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Conversation:
    messages: list[dict]
    answers: list[int]          # indices of the assistant messages that answer a question about a fact
    expected: list[str | None]  # per assistant message: the reply it must be (None: unscored small talk)
    facts: dict[str, str]


def draw_facts(rng: random.Random, split: str, n: int) -> dict[str, str]:
    kinds = rng.sample(STATED_KINDS, n)
    facts = {k: draw_value(rng, k, split) for k in kinds}
    if "pet" in facts:
        facts["species"] = draw_value(rng, "species", split)
    return facts


def _turns_for_facts(rng: random.Random, facts: dict[str, str], split: str) -> list[tuple[str, str]]:
    """The statements of the facts, two of them sometimes in one message, in random order."""
    kinds = [k for k in facts if k != "species"]
    rng.shuffle(kinds)
    turns = [statement(rng, k, facts, split) for k in kinds]
    if len(turns) >= 2 and rng.random() < 0.15:
        (u1, a1), (u2, a2) = turns[:2]
        u1 = u1 if u1[-1] in ".!?" else u1 + "."
        ack = a1 if a1.startswith("Nice") else a2
        turns = [(f"{u1} {u2}", ack)] + turns[2:]
    return turns


def _questions(rng: random.Random, facts: dict[str, str]) -> list[str]:
    """Kinds to ask about: the stated facts in random order (the pet's species sometimes too), some of them, a
    repeat now and then, and rarely a fact that was never stated."""
    kinds = [k for k in facts if k != "species" or rng.random() < 0.5]
    rng.shuffle(kinds)
    kinds = kinds[:rng.randint(max(1, len(kinds) - 1), len(kinds))]
    if rng.random() < 0.2:
        kinds.append(rng.choice(kinds))
    if rng.random() < 0.05:
        kinds.insert(rng.randint(0, len(kinds)), rng.choice([k for k in KINDS if k not in facts]))
    return kinds


def make_conversation(rng: random.Random, split: str = "train", short: bool = False) -> Conversation:
    """One conversation. short: at most two facts and no small talk (the first, cheaper stage of training)."""
    n_facts = rng.choice([1, 1, 2]) if short else rng.choice([1, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    chat = 0.0 if short else 1.0
    facts = draw_facts(rng, split, n_facts)
    turns: list[tuple[str, str | None, bool]] = []  # (user, expected reply, is a fact answer)
    if rng.random() < 0.2 * chat:
        turns.append((*small_talk(rng, split), False))
    for u, a in _turns_for_facts(rng, facts, split):
        turns.append((u, a, False))
        if rng.random() < 0.3 * chat:
            turns.append((*small_talk(rng, split), False))
    for qi, kind in enumerate(_questions(rng, facts)):
        if qi and rng.random() < 0.25 * chat:
            turns.append((*small_talk(rng, split), False))
        turns.append((*question(rng, kind, facts, split), True))
    return _assemble(rng, turns, facts)


def _assemble(rng: random.Random, turns, facts) -> Conversation:
    msgs: list[dict] = []
    if rng.random() < 0.15:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    answers, expected = [], []
    for user, reply, is_answer in turns:
        msgs.append({"role": "user", "content": user})
        # Unscored held-out small talk still needs some reply in the history of a training-style rendering.
        msgs.append({"role": "assistant", "content": reply if reply is not None else "OK."})
        expected.append(reply)
        if is_answer:
            answers.append(len(msgs) - 1)
    return Conversation(msgs, answers, expected, facts)
