"""Token-addressed checkpoints through the real server and the real `openai` client: every client behaviour hits
the checkpoint it should, with the text of a recompute-everything server (`--cache-mode none`)."""
from __future__ import annotations

import threading

import httpx
import pytest

from test_server import COMMON, KEY, ServerProcess, chat_turn, server_env, workdir  # noqa: F401 (fixtures)

TEMPLATE_STRIPS_THINK = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}"
    "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think></think>{% endif %}")
THINK_GEN_PROMPT = 1 + len("<think></think>")  # <|assistant|> is one id, the rest bytes
TURNS = ["My name is Zora.", "What is 3+4?", "I live in Oslo.", "Do you like music?", "What is my name?",
         "Where do I live?"]


def _server(name, workdir, env, *args):
    return ServerProcess(name, workdir, [*COMMON, *args], env).start()


@pytest.fixture(scope="module")
def exact(workdir, server_env):
    srv = _server("tree-exact", workdir, server_env, "--cache-mode", "exact", "--api-key", KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def none(workdir, server_env):
    srv = _server("tree-none", workdir, server_env, "--cache-mode", "none", "--api-key", KEY)
    yield srv
    srv.stop()


def ask(srv, messages, salt, conv=None):
    return chat_turn(srv.client(KEY), messages, conv, salt)


def both(exact, none, messages, salt):
    """The turn on the exact server, checked against the recompute server (same text and prompt)."""
    got, want = ask(exact, messages, salt), ask(none, messages, salt + "-ref")
    assert (got.text, got.prompt_tokens, got.finish_reason) == (want.text, want.prompt_tokens, want.finish_reason)
    assert want.cached_tokens == 0
    return got


def run_history(exact, none, salt, turns=TURNS):
    history, out = [], []
    for text in turns:
        history.append({"role": "user", "content": text})
        t = both(exact, none, history, salt)
        history.append({"role": "assistant", "content": t.text})
        out.append(t)
    return history, out


def test_full_history_without_an_id_hits_every_turn(exact, none):
    _, turns = run_history(exact, none, "full")
    assert turns[0].cached_tokens == 0
    for prev, cur in zip(turns, turns[1:]):
        assert cur.cached_tokens == prev.committed  # everything the previous turn consumed


def test_template_that_strips_reasoning_hits_the_prompt_boundary(workdir, server_env):
    exact = _server("think-exact", workdir, server_env, "--cache-mode", "exact", "--api-key", KEY,
                    "--chat-template", TEMPLATE_STRIPS_THINK)
    none = _server("think-none", workdir, server_env, "--cache-mode", "none", "--api-key", KEY,
                   "--chat-template", TEMPLATE_STRIPS_THINK)
    try:
        _, turns = run_history(exact, none, "think", TURNS[:4])
    finally:
        exact.stop()
        none.stop()
    for prev, cur in zip(turns, turns[1:]):
        # The re-rendered history drops the previous answer's reasoning, so the end-of-turn checkpoint is no
        # prefix any more; the checkpoint where the previous generation prompt began still is.
        assert cur.cached_tokens == prev.prompt_tokens - THINK_GEN_PROMPT


def test_regenerate_edit_fork_and_shared_system_prompt(exact, none):
    history, base = run_history(exact, none, "beh", TURNS[:5])
    # regenerate the last answer: the checkpoint where turn 5's generation prompt begins
    regen = both(exact, none, history[:-1], "beh")
    assert regen.cached_tokens == base[4].prompt_tokens - 1
    # edit the last user message: the state after turn 4
    edit = both(exact, none, history[:8] + [{"role": "user", "content": "Where do I live?"}], "beh")
    assert edit.cached_tokens == base[3].committed
    # edit the first message: nothing of the old conversation is a prefix
    first = both(exact, none, [{"role": "user", "content": "My name is Tala."}] + history[1:-1], "beh")
    assert first.cached_tokens == 0
    # fork from turn 2 of 5
    fork = both(exact, none, history[:4] + [{"role": "user", "content": "Where do I live?"}], "beh")
    assert fork.cached_tokens == base[1].committed
    # two new conversations that open with the same 300-token system prompt
    system = {"role": "system", "content": ("You are a careful assistant who remembers what the user says. " * 5)[:300]}
    both(exact, none, [system, {"role": "user", "content": "My name is Zora."}], "sys")
    second = both(exact, none, [system, {"role": "user", "content": "I live in Oslo."}], "sys")
    assert second.cached_tokens == 1 + 300 + 1  # <|system|> + the prompt + <|end|>


def test_delete_racing_a_new_turn_never_brings_the_fact_back(exact, none):
    fresh = ask(none, [{"role": "user", "content": TURNS[4]}], "race-ref")  # the answer without the fact
    for i in range(50):
        conv, salt = "race", f"race-{i}"  # a salt of its own: only the deleted conversation could be attached
        first = ask(exact, [{"role": "user", "content": TURNS[0]}], salt, conv)
        out: dict = {}

        def delete():
            with exact.http(KEY) as http:
                out["delete"] = http.delete(f"/v1/conversations/{conv}", params={"cache_salt": salt}).status_code

        t = threading.Thread(target=delete)
        t.start()
        turn = ask(exact, [{"role": "user", "content": TURNS[4]}], salt, conv)  # never conflicts: a delete
        t.join()                                                                 # takes no lease
        with_history = turn.prompt_tokens > fresh.prompt_tokens
        if with_history:  # the turn leased first: the delete either waited for it (409) or came after it
            assert out["delete"] in (200, 409)
            assert turn.cached_tokens == first.committed
        else:  # the delete came first: a new conversation, nothing of the deleted state attached
            assert out["delete"] == 200
            assert (turn.text, turn.cached_tokens) == (fresh.text, 0)
    # and a turn after the deletes never sees the fact
    with exact.http(KEY) as http:
        http.delete("/v1/conversations/race", params={"cache_salt": "race-0"})
    after = ask(exact, [{"role": "user", "content": TURNS[4]}], "race-0", "race")
    assert (after.text, after.cached_tokens) == (fresh.text, 0)


def test_list_conversations_of_a_salt(exact):
    for conv in ("l1", "l2"):
        ask(exact, [{"role": "user", "content": TURNS[0]}], "list-salt", conv)
    with exact.http(KEY) as http:
        r = http.get("/v1/conversations", params={"cache_salt": "list-salt"})
        assert r.status_code == 200, r.text
        assert sorted(c["conversation_id"] for c in r.json()["data"]) == ["l1", "l2"]
        assert http.get("/v1/conversations", params={"cache_salt": "other"}).json()["data"] == []
    with pytest.raises(httpx.HTTPStatusError):
        with exact.http() as http:  # keyed server: the list needs the key
            http.get("/v1/conversations", params={"cache_salt": "list-salt"}).raise_for_status()
