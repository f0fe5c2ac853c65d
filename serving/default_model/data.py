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
and random numbers, so the answer can only be found in the conversation.
"""
from __future__ import annotations

import dataclasses
import random
import string

from serving.default_model import vocab as V

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


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of fact: how it is stated, how it is asked for, how the statement is acknowledged."""
    statements: dict[str, list[str]]   # split -> templates with {v} (and {s}, {a} for pets)
    questions: dict[str, list[str]]
    ack: str = "Got it: {v}."


KINDS = {
    "name": Kind(
        {"train": ["My name is {v}.", "I'm {v}.", "I am {v}.", "Call me {v}.", "You can call me {v}.",
                   "Everyone calls me {v}.", "My friends call me {v}.", "The name is {v}.", "Name's {v}.",
                   "This is {v}.", "This is {v} speaking.", "{v} here.", "My name's {v}.", "Please call me {v}.",
                   "I am called {v}.", "They call me {v}.", "I'm called {v}.", "Me? I'm {v}.",
                   "My name? It's {v}."],
         "heldout": ["People call me {v}.", "My first name is {v}.", "Hi there, I'm {v}.", "Hello! I am {v}.",
                     "It's me, {v}.", "Good morning, my name is {v}."]},
        {"train": ["What is my name?", "What's my name?", "Who am I?", "Do you remember my name?",
                   "Can you tell me my name?", "Tell me my name.", "What did I say my name was?",
                   "What name did I give you?", "Remind me, what is my name?", "What am I called?",
                   "Remember my name?", "What should you call me?", "What do you call me?", "Who am I to you?",
                   "My name, what is it?", "Can you say my name?"],
         "heldout": ["Do you know my name?", "What was my name?", "Say my name.", "And my name is?",
                     "Do you still know my name?"]},
        ack="Nice to meet you, {v}."),
    "city": Kind(
        {"train": ["I live in {v}.", "I'm from {v}.", "I am from {v}.", "I come from {v}.",
                   "My home town is {v}.", "My hometown is {v}.", "Home for me is {v}.", "I live in {v} now.",
                   "My city is {v}.", "I am living in {v}.", "I'm based in {v}.", "I moved to {v}.",
                   "I stay in {v}.", "We live in {v}.", "Right now I live in {v}."],
         "heldout": ["These days I live in {v}.", "My home is in {v}.", "I live in the city of {v}.",
                     "I'm living in {v}."]},
        {"train": ["Where do I live?", "Where am I from?", "What is my home town?", "What's my hometown?",
                   "Which city am I from?", "Where is my home?", "What city do I live in?",
                   "Do you remember where I live?", "Where did I say I'm from?", "Which town do I live in?",
                   "Where's my home town?", "Tell me where I live.", "Where was I from?", "Where is it that I live?",
                   "Which place do I live in?"],
         "heldout": ["Which city do I live in?", "Where did I say I live?", "Where do I come from?",
                     "Do you know where I live?"]}),
    "pet": Kind(
        {"train": ["My {s} is called {v}.", "I have {a} called {v}.", "I have {a} named {v}.",
                   "My {s}'s name is {v}.", "My pet {s} is {v}.", "Our {s} is called {v}.",
                   "My pet is {a} called {v}.", "I own {a} called {v}.", "My {s} goes by {v}.",
                   "I have {a}. Its name is {v}.", "We have {a} called {v}.", "My pet's name is {v}, it is {a}."],
         "heldout": ["My {s} is named {v}.", "I've got {a} called {v}.", "The name of my {s} is {v}.",
                     "We have {a} named {v}."]},
        {"train": ["What is my {s} called?", "What is my {s}'s name?", "What is my pet called?",
                   "What is my pet's name?", "What's the name of my {s}?", "Do you remember my {s}'s name?",
                   "What's my {s} called?", "What is the name of my pet?", "Tell me my {s}'s name.",
                   "What did I name my {s}?", "What's my pet's name?", "Who is my {s}?",
                   "What was the name of my pet?"],
         "heldout": ["What did I call my {s}?", "What was my {s}'s name?", "What was my pet called?",
                     "Do you know what my {s} is called?"]}),
    "species": Kind(
        {"train": [], "heldout": []},  # stated together with the pet's name
        {"train": ["What pet do I have?", "What kind of pet do I have?", "What animal do I have?",
                   "What kind of animal is my pet?", "What is my pet?", "Which pet do I own?", "What animal is my pet?",
                   "What sort of animal do I own?"],
         "heldout": ["Which animal do I have?", "What sort of pet do I have?"]}),
    "colour": Kind(
        {"train": ["My favourite colour is {v}.", "My favorite color is {v}.", "My favourite color is {v}.",
                   "I love the colour {v}.", "I like the color {v}.", "I like {v} best.",
                   "The colour I like most is {v}.", "My best colour is {v}.", "My favourite colour? It's {v}.",
                   "The colour I love most is {v}.", "I like the colour {v} a lot."],
         "heldout": ["My favorite colour is {v}.", "I really like the colour {v}.", "The color I love is {v}.",
                     "I am a fan of the colour {v}."]},
        {"train": ["What is my favourite colour?", "What's my favorite color?", "Which colour do I like?",
                   "Which colour do I like best?", "What colour do I love?",
                   "Do you remember my favourite colour?", "What is my favorite color?",
                   "Tell me my favorite color.", "What colour did I pick?", "Which color do I love?",
                   "What colour do I like most?", "What was my colour?", "What colour did I tell you?"],
         "heldout": ["What was my favourite color?", "Which color do I like most?",
                     "What colour did I say I like?", "Tell me my favourite colour."]}),
    "number": Kind(
        {"train": ["My lucky number is {v}.", "My favourite number is {v}.", "My favorite number is {v}.",
                   "Remember the number {v}.", "Please remember the number {v}.", "Remember {v}.",
                   "My number is {v}.", "The number is {v}.", "Can you remember {v}?",
                   "Keep in mind the number {v}.", "My secret number is {v}.", "Remember this number: {v}."],
         "heldout": ["Please remember {v} for me.", "Keep the number {v} in mind.", "Note the number {v}.",
                     "My lucky number is {v}, remember it."]},
        {"train": ["What is my number?", "What number did I give you?", "Which number should you remember?",
                   "What was the number?", "What is my lucky number?", "What is my favourite number?",
                   "Do you remember my number?", "What number should you remember?", "Tell me my number.",
                   "What's my secret number?", "What was my lucky number?", "Which number was it?",
                   "Remind me of my number."],
         "heldout": ["What number did I tell you?", "Which number did I ask you to remember?",
                     "What was my number?", "Tell me the number."]}),
    "age": Kind(
        {"train": ["I am {v} years old.", "I'm {v} years old.", "My age is {v}.", "I turned {v} this year.",
                   "I just turned {v}.", "I'm {v}.", "I'm {v} years old now."],
         "heldout": ["I am {v} years of age.", "I recently turned {v}.", "I'm {v} now."]},
        {"train": ["How old am I?", "What is my age?", "What's my age?", "How old did I say I am?",
                   "Tell me my age.", "What age did I give you?", "How old was I?", "What was my age?",
                   "Do you know my age?"],
         "heldout": ["Do you remember how old I am?", "What age am I?", "How old did I tell you I am?"]}),
    "birthday": Kind(
        {"train": ["My birthday is on {v}.", "My birthday is {v}.", "I was born on {v}.",
                   "My birthday falls on {v}.", "My birthday's on {v}.", "I have my birthday on {v}.",
                   "Born on {v}."],
         "heldout": ["I celebrate my birthday on {v}.", "My date of birth is {v}."]},
        {"train": ["When is my birthday?", "When was I born?", "What is my birthday?", "What date is my birthday?",
                   "When's my birthday?", "Which day is my birthday?", "When do I have my birthday?",
                   "What was my birthday?", "Tell me my birthday.", "On which date was I born?"],
         "heldout": ["Do you remember my birthday?", "When do I celebrate my birthday?",
                     "What day is my birthday?"]}),
}
STATED_KINDS = [k for k in KINDS if k != "species"]

# Lead-ins and endings are shared by both splits: a held-out phrasing is a held-out sentence above, dressed the same
# way as training sentences are.
STATEMENT_PREFIXES = ["Oh, ", "By the way, ", "Also, ", "And ", "Well, ", "OK, ", "Hi, ", "Hello, ", "Hey, ", "Hi! ",
                      "Hello! ", "So, ", "Just so you know, "]
STATEMENT_SUFFIXES = [" Please remember that.", " Remember that.", " Don't forget it.", " Thanks.", " OK?",
                      " Keep that in mind.", " Can you remember that?"]
QUESTION_PREFIXES = ["Quick question: ", "Hey, ", "OK, ", "Now, ", "Sorry, ", "Remind me: ", "Hmm, ", "So, ",
                     "Tell me, ", "One more thing: "]
QUESTION_TAILS = [" again", " now", " please"]  # "What is my name again?"
# Training only: a filler inserted at a random place of a statement or question, so that the model keys on the
# words that matter (name, live, old, number, ...) and not on one exact sentence.
FILLERS = ["really", "actually", "just", "exactly", "still", "then", "so", "well", "you know", "I think", "anyway",
           "by the way", "now", "again", "please"]



def _pairs(text: str) -> list[tuple[str, str]]:
    """'user message -> reply' lines."""
    return [tuple(part.strip() for part in line.split(" -> ")) for line in text.strip().splitlines()]


SMALL_TALK = {
    "train": _pairs("""
        Hi! -> Hello!
        Hello! -> Hi there!
        Hey. -> Hello!
        Good morning! -> Good morning!
        Good evening! -> Good evening!
        How are you? -> I am fine, thanks.
        How are you doing? -> I am doing well, thanks.
        Thanks! -> You are welcome.
        Thank you. -> You are welcome.
        What can you do? -> I can chat and remember what you tell me.
        Who are you? -> I am a small chat model.
        What is your name? -> I am a small chat model.
        Where do you live? -> I live in a computer.
        Are you a robot? -> I am a small language model.
        Do you have a pet? -> No, I do not.
        What is your favourite colour? -> I like every colour.
        How old are you? -> I am quite new.
        Tell me a joke. -> Why did the cat sit on the computer? To keep an eye on the mouse.
        Is the sky blue? -> Yes.
        Is fire cold? -> No.
        What colour is grass? -> Green.
        Is water wet? -> Yes.
        Can birds fly? -> Most of them can.
        What time is it? -> I do not know.
        What is the weather like? -> I cannot see outside.
        What is the capital of France? -> I do not know.
        Can you help me? -> Sure, what do you need?
        Goodbye! -> Goodbye!
        See you later. -> See you!
        Nice to meet you. -> Nice to meet you too.
        I am tired. -> Then rest a little.
        I had a long day. -> I am sorry to hear that.
        It is raining here. -> I see.
        I just had lunch. -> Sounds good.
        I like this chat. -> Me too.
        OK. -> OK.
        Cool. -> Yes.
        Say hello. -> Hello.
        Are you there? -> Yes, I am here.
        Do you sleep? -> No, I do not.
        Good night! -> Good night!
        Can you sing? -> Not really.
        Do you dream? -> No.
        Are you happy? -> Yes, I am.
        What day is it today? -> I do not know.
        Can you cook? -> No, I cannot.
        What are you doing? -> Chatting with you.
        I am hungry. -> Time for a snack, then.
        That is funny. -> I am glad you think so.
        Do you like me? -> Of course.
        Where are you? -> In a computer.
        What is the time? -> I do not know."""),
    # Unseen small talk: scored only for not answering with a stated fact.
    "heldout": [("How's it going?", None), ("What a lovely day.", None), ("Is it going to rain?", None),
                ("What should I cook tonight?", None), ("I am bored.", None), ("Do you speak French?", None),
                ("Can you dance?", None), ("Hello again!", None)],
}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly chatbot.", "Answer briefly.",
                  "You are a small assistant that remembers what the user says."]


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
