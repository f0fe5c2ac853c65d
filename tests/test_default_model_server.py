"""The embedded default model holds a conversation through the real server: facts stated in one turn are
recalled turns later, with only the new message sent each turn (the conversation cache carries the history).

Accuracy over a fixed set of cases written here, not one lucky case. Names follow the training distribution
(pronounceable 4-6 letters, alternating consonants and vowels; see serving/default_model/train.py): the test is
about memory across turns, not about spelling unseen name shapes.
"""
from __future__ import annotations

import os

import pytest

import test_server
from test_server import NAME, ServerProcess, chat_turn

# (fact turn, filler turns, question, expected answer substring)
CASES = [
    ("My name is Zora.", ["What is 3+4?"], "What is my name?", "Zora"),
    ("Remember the number 417.", ["Say hello."], "What is my number?", "417"),
    ("My favourite colour is teal.", ["What is 2+5?", "Is the sky blue?"], "What is my favourite colour?", "teal"),
    ("I live in Borita.", ["What can you do?"], "Where do I live?", "Borita"),
    ("My pet is called Fenabo.", ["What is 6+1?"], "What is my pet called?", "Fenabo"),
    ("Hi, I am Kiluro.", ["Do you like music?", "What is 4+4?"], "Who am I?", "Kiluro"),
    ("My number is 852.", ["What colour is grass?"], "What number did I give you?", "852"),
    ("I like the colour amber.", ["Say hello."], "Which colour do I like?", "amber"),
    ("My home town is Tavik.", ["What is 1+8?"], "What is my home town?", "Tavik"),
    ("My dog's name is Rumi.", ["Is the sky blue?"], "What is my pet's name?", "Rumi"),
    ("Call me Odira.", ["What is 9+3?", "Say hello."], "What's my name?", "Odira"),
    ("Remember the number 129.", ["Do you like music?"], "Which number should you remember?", "129"),
    ("My favorite color is violet.", ["What is 5+5?"], "What is my favorite color?", "violet"),
    ("I live in Mareno.", ["What colour is grass?", "What is 2+2?"], "Where do I live?", "Mareno"),
    ("My pet is called Bizapo.", ["Say hello."], "What is my pet called?", "Bizapo"),
    ("My name is Talim.", ["What can you do?"], "What is my name?", "Talim"),
    ("My number is 604.", ["What is 7+2?"], "What is my number?", "604"),
    ("My favourite colour is crimson.", ["Is the sky blue?"], "What is my favourite colour?", "crimson"),
    ("Hi, I am Perino.", ["What is 3+3?", "Do you like music?"], "Who am I?", "Perino"),
    ("My home town is Jolen.", ["Say hello."], "Where do I live?", "Jolen"),
    ("Remember the number 375.", ["What colour is grass?"], "What number did I give you?", "375"),
    ("My dog's name is Kesoba.", ["What is 8+1?"], "What is my pet's name?", "Kesoba"),
]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    env = dict(os.environ)
    env.pop("SERVING_TEST_MODEL", None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    srv = ServerProcess("default", tmp_path_factory.mktemp("default-server"),
                        ["--served-model-name", NAME, "--max-model-len", "1024", "--log-level", "warning"], env)
    saved, test_server.MODEL = test_server.MODEL, None  # this test is about the default model, whatever
    try:                                                # SERVING_TEST_MODEL says
        srv.start()
    finally:
        test_server.MODEL = saved
    yield srv
    srv.stop()


def test_default_model_recalls_facts_through_the_conversation_cache(default_server):
    client = default_server.client()
    correct, answers = 0, []
    for i, (fact, fillers, question, want) in enumerate(CASES):
        conv = f"recall-{i}"
        turns = [chat_turn(client, [{"role": "user", "content": text}], conv, "recall", max_tokens=24)
                 for text in [fact, *fillers, question]]
        # every turn after the first reuses the whole committed conversation: only the new message was sent
        for prev, t in zip(turns, turns[1:]):
            assert t.cached_tokens == prev.committed > 0
        answers.append((question, want, turns[-1].text))
        correct += want.lower() in turns[-1].text.lower()
    accuracy = correct / len(CASES)
    print(f"recall accuracy {accuracy:.2f}: {answers}")
    assert accuracy >= 0.8, answers
