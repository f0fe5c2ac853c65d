"""The embedded default model holds a conversation through the real server (`python -m serving` subprocess on a
loopback port, real `openai` client): facts stated in one turn are recalled turns later, with only the new message
sent each turn (the conversation cache carries the history), and small talk in between does not pull them out.

The cases below are natural phrasings written here, not drawn from the training generator; most words in them
(Marcus, Lisbon, Rex, tea, ...) are in the held-out lists that no training conversation contains
(training/default_model/vocab.py). The score is an accuracy over all conversations, with a threshold that a model
that only echoes its training vocabulary would fail.

The same server also runs README.md's first conversation exactly as written there (only the address is the test
server's) and checks that it prints what README shows.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import test_server
from test_server import NAME, ServerProcess, chat_turn

ROOT = Path(__file__).resolve().parents[1]
README_URL = "http://127.0.0.1:8000"

# (turns the user sends, one at a time; expected fact in the reply to the last one)
CASES = [
    (["My name is Marcus.", "What is my name?"], "Marcus"),
    (["I live in Lisbon.", "Do you like tea?", "Where do I live?"], "Lisbon"),
    (["My lucky number is 17.", "What is my lucky number?"], "17"),
    (["My dog is called Rex", "How are you?", "What is my dog called?"], "Rex"),
    (["Hi, I'm Priya.", "Who am I?"], "Priya"),
    (["I'm from Oslo.", "What is 2+2?", "Where am I from?"], "Oslo"),
    (["Call me Sophie.", "Do you remember my name?"], "Sophie"),
    (["My favourite colour is cobalt.", "Tell me a joke.", "What is my favourite colour?"], "cobalt"),
    (["I am 34 years old.", "How old am I?"], "34"),
    (["My birthday is on 3 May.", "Thanks!", "When is my birthday?"], "3 May"),
    (["I have a cat called Pumpkin.", "What is my cat called?"], "Pumpkin"),
    (["My name is Keiko.", "I live in Nagoya.", "Where do I live?"], "Nagoya"),
    (["My name is Keiko.", "I live in Nagoya.", "What's my name?"], "Keiko"),
    (["Remember the number 2024.", "Do you like music?", "What number did I give you?"], "2024"),
    (["Please remember the number 5.", "Which number should you remember?"], "5"),
    (["My favorite color is salmon.", "Which colour do I like?"], "salmon"),
    (["I come from Montevideo.", "Good morning!", "Where do I come from?"], "Montevideo"),
    (["Hello, my name is Tomasz.", "Is the sky blue?", "What is my name?"], "Tomasz"),
    (["My hamster's name is Nibbles.", "What is my hamster's name?"], "Nibbles"),
    (["I'm Declan.", "I'm 52 years old.", "How old am I?"], "52"),
    (["I'm Declan.", "I'm 52 years old.", "Who am I?"], "Declan"),
    (["My home town is Aberdeen.", "What is my home town?"], "Aberdeen"),
    (["Everyone calls me Beatriz.", "What a lovely day.", "What do you call me?"], "Beatriz"),
    (["I was born on July 9th.", "When was I born?"], "July 9th"),
    (["My parrot is called Figaro.", "Do you like basketball?", "What's my parrot called?"], "Figaro"),
    (["My number is 808.", "What is 3+5?", "What is my number?"], "808"),
    (["I like the colour plum.", "What colour do I love?"], "plum"),
    (["You can call me Hamid.", "Can you help me?", "What is my name?"], "Hamid"),
    (["I live in Hong Kong.", "Where is my home?"], "Hong Kong"),
    (["I have a rabbit named Bramble.", "What is my pet's name?"], "Bramble"),
    (["My age is 9.", "What is my age?"], "9"),
    (["My name is Anjali.", "My lucky number is 61.", "What is my lucky number?"], "61"),
    (["My name is Anjali.", "My lucky number is 61.", "Do you like yoga?", "What is my name?"], "Anjali"),
    (["My birthday is 14 February.", "What is my birthday?"], "14 February"),
    (["I'm from Gdansk.", "Have you been to Paris?", "Which city am I from?"], "Gdansk"),
    (["My name is Ingrid.", "How are you doing?", "Tell me my name."], "Ingrid"),
    (["My favourite number is 4321.", "What is my favourite number?"], "4321"),
    (["Our dog is called Sherlock.", "I live in Bruges.", "What is my dog called?"], "Sherlock"),
    (["Our dog is called Sherlock.", "I live in Bruges.", "Where do I live?"], "Bruges"),
    (["I'm Kwame.", "What is my name?"], "Kwame"),
    (["My favourite colour is sea green.", "Do you like sushi?", "What's my favorite color?"], "sea green"),
    (["I moved to Coimbra.", "What city do I live in?"], "Coimbra"),
    (["My name is Oluwaseun.", "What is my name?"], "Oluwaseun"),
    (["I have a turtle called Tofu.", "What pet do I have?"], "turtle"),
]
THRESHOLD = 0.85


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The default server as a first start runs it: default warm-up, an empty compilation cache."""
    env = dict(os.environ)
    env.pop("SERVING_TEST_MODEL", None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    work = tmp_path_factory.mktemp("default-server")
    srv = ServerProcess("default", work, ["--served-model-name", NAME, "--max-model-len", "1024",
                                          "--compilation-cache-dir", str(work / "jax")], env)
    saved, test_server.MODEL = test_server.MODEL, None  # this test is about the default model, whatever
    try:                                                # SERVING_TEST_MODEL says
        srv.start()
        srv.programs_when_healthy = srv.step_programs()
    finally:
        test_server.MODEL = saved
    yield srv
    srv.stop()


def test_a_first_start_serves_before_every_program_is_compiled(default_server):
    """Healthy once the programs of a first request are compiled; the rest compile in the background, and the
    log (a file here, not a terminal) says how far that got."""
    compiled, total = default_server.programs_when_healthy
    assert 0 < compiled < total
    default_server.wait_until_compiled()
    log = default_server.log_path.read_text(errors="replace")
    first = int(re.search(r"warm-up: (\d+) step programs ready", log).group(1))
    rest = total - first
    assert re.search(rf"background warm-up: \d+/{rest} step programs compiled \(\d+s\)", log), log[-3000:]
    assert f"background warm-up: {rest} step programs ready" in log


def converse(client, conversation_id: str, messages: list[str]):
    """Send the messages one turn at a time (only the new message each turn); the turns' results. Each
    conversation has a salt of its own, so no state is shared between conversations."""
    return [chat_turn(client, [{"role": "user", "content": text}], conversation_id, conversation_id, max_tokens=40)
            for text in messages]


def test_default_model_recalls_facts_through_the_conversation_cache(default_server):
    client = default_server.client()
    with ThreadPoolExecutor(4) as pool:  # concurrent conversations: the engine batches them
        runs = list(pool.map(lambda ic: converse(client, f"recall-{ic[0]}", ic[1][0]), enumerate(CASES)))
    correct, leaks, wrong = 0, 0, []
    for (messages, want), turns in zip(CASES, runs):
        # every turn after the first reuses the whole committed conversation: only the new message was sent
        for prev, t in zip(turns, turns[1:]):
            assert t.cached_tokens == prev.committed > 0
        answer = turns[-1].text
        if want.lower() in answer.lower():
            correct += 1
        else:
            wrong.append((messages[-1], want, answer))
        # small talk between the facts and the question must not answer with the fact
        leaks += any(want.lower() in t.text.lower() for m, t in zip(messages[1:-1], turns[1:-1])
                     if want.lower() not in m.lower() and not m.startswith(("I ", "My ", "Our ")))
    accuracy = correct / len(CASES)
    print(f"recall {correct}/{len(CASES)} = {accuracy:.3f}; small talk that leaked a fact: {leaks}; wrong: {wrong}")
    assert len(CASES) >= 40
    assert accuracy >= THRESHOLD, wrong
    assert leaks <= 1


# ------------------------------------------------------------------------------------------------------------
# README's first conversation
# ------------------------------------------------------------------------------------------------------------


def readme_first_conversation() -> tuple[str, str]:
    """(the bash snippet, the output README shows for it) under README's '## A first conversation'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## A first conversation", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    script = next(body for lang, body in blocks if lang == "bash")
    shown = next(body for lang, body in blocks if lang == "")
    return script, shown


def test_readme_first_conversation_runs_as_written(default_server):
    script, shown = readme_first_conversation()
    assert README_URL in script
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    out = subprocess.run(["bash", "-c", script.replace(README_URL, default_server.url)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown, f"README shows:\n{shown}\nthe server answered:\n{out.stdout}"
    assert "Marcus" in shown.splitlines()[-1]  # the recall README promises
