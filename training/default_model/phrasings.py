"""The phrasings of the default model's synthetic chats (training/default_model/data.py draws from them): for each
kind of fact how it is stated, how it is asked for and how the statement is acknowledged (`KINDS`), the lead-ins,
endings and fillers around them, small talk and system prompts. Every list has a training part and a held-out
part (`"train"` / `"heldout"`) where the split matters: no training conversation uses a held-out phrasing."""
from __future__ import annotations

import dataclasses


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
