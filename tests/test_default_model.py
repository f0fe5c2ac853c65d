"""The shipped default model (serving/default_model) recalls facts from earlier turns of a conversation.

Each conversation below is played turn by turn exactly as a chat client would: the prompt is the ByteTokenizer
chat template of the history, every assistant reply is the model's own greedy generation through
`hybrid_jax.generate_greedy` (the engine's paged-cache prefill + decode path), cut at `<|end|>`, and goes back
into the history. Only the answers to the fact questions are scored; the set must be >= 80% right.
"""
import json
import os

import pytest

from hybrid_jax import generate_greedy, load_pretrained
from serving.tokenizer import ByteTokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "serving", "default_model")
MAX_NEW_TOKENS = 32
# One 256-token KV block per sequence: every conversation shares one cache shape, so the steps compile once.
BLOCK_SIZE = 256

# (user message, expected reply or None when the reply is not scored); an optional leading ("system", text).
CONVERSATIONS = [
    [("My name is Zora.", None), ("What is 3+4?", None), ("What is my name?", "Zora.")],
    [("Remember the number 417.", None), ("How are you?", None), ("What is my number?", "417.")],
    [("My favourite colour is teal.", None), ("What is 5+2?", None), ("Thanks!", None),
     ("What is my favourite colour?", "teal.")],
    [("I live in Lumeva.", None), ("Hi!", None), ("Where do I live?", "Lumeva.")],
    [("My pet is called Rufo.", None), ("Is the sky blue?", None), ("What is my pet called?", "Rufo.")],
    [("Call me Kemal.", None), ("What is 9+9?", None), ("Say hello.", None), ("What's my name?", "Kemal.")],
    [("Please remember 862.", None), ("What is 1+1?", None), ("Which number should you remember?", "862.")],
    [("I like the colour coral.", None), ("Good morning!", None), ("Which colour do I like?", "coral.")],
    [("My name is Tavi.", None), ("What is 6+3?", None), ("My number is 305.", None),
     ("What is my name?", "Tavi."), ("What is my number?", "305.")],
    [("Hi, I am Nadira.", None), ("Do you like music?", None), ("Who am I?", "Nadira.")],
    [("Remember the number 128.", None), ("What is 4+4?", None), ("What is 2+7?", None),
     ("What number did I give you?", "128.")],
    [("My favorite color is indigo.", None), ("What is my favorite color?", "indigo.")],
    [("My home town is Barelo.", None), ("What is 8+1?", None), ("What is my home town?", "Barelo.")],
    [("My dog's name is Pipa.", None), ("How are you?", None), ("What is my pet's name?", "Pipa.")],
    [("system", "You are a helpful assistant."), ("My name is Osiro.", None), ("Thanks!", None),
     ("What is my name?", "Osiro.")],
    [("I live in Vokani.", None), ("My pet is called Melu.", None), ("Where do I live?", "Vokani."),
     ("What is my pet called?", "Melu.")],
    [("My number is 999.", None), ("Is fire cold?", None), ("What is 0+5?", None), ("What is my number?", "999.")],
    [("My favourite colour is maroon.", None), ("My name is Eliko.", None),
     ("What is my favourite colour?", "maroon.")],
    [("Call me Dunaro.", None), ("What is 7+8?", None), ("Who am I?", "Dunaro.")],
    [("Please remember 540.", None), ("Hi!", None), ("What can you do?", None),
     ("Which number should you remember?", "540.")],
    [("My name is Sefa.", None), ("What is 2+2?", None), ("Remember the number 731.", None),
     ("What is my number?", "731.")],
    [("I like the colour olive.", None), ("What is 3+3?", None), ("Which colour do I like?", "olive.")],
    [("My home town is Irumo.", None), ("Good morning!", None), ("Say hello.", None), ("Where do I live?", "Irumo.")],
    [("My dog's name is Kovu.", None), ("What is 5+5?", None), ("What is my pet's name?", "Kovu.")],
    [("Hi, I am Lamiru.", None), ("What is 1+8?", None), ("What is my name?", "Lamiru.")],
]


@pytest.fixture(scope="module")
def model():
    cfg, params = load_pretrained(MODEL_DIR)
    return cfg, params


def play(cfg, params, tok: ByteTokenizer, conv) -> list[tuple[str, str | None]]:
    """Run one conversation turn by turn; returns (model reply, expected) per user turn."""
    end = tok.SPECIAL_TOKENS["<|end|>"]
    history, out = [], []
    for user, expected in conv:
        if user == "system":
            history.append({"role": "system", "content": expected})
            continue
        history.append({"role": "user", "content": user})
        prompt = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        assert len(prompt) + MAX_NEW_TOKENS <= BLOCK_SIZE
        ids = generate_greedy(params, cfg, prompt, MAX_NEW_TOKENS, block_size=BLOCK_SIZE)
        if end in ids:
            ids = ids[:ids.index(end)]
        reply = tok.decode(ids)
        history.append({"role": "assistant", "content": reply})
        out.append((reply, expected))
    return out


def test_shipped_files():
    for name in ("config.json", "model.safetensors", "byte_tokenizer.json", "training.json", "README.md"):
        assert os.path.isfile(os.path.join(MODEL_DIR, name)), name
    assert isinstance(load_tokenizer(MODEL_DIR), ByteTokenizer)
    assert os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors")) < 8 * 2**20  # "a few MB"
    with open(os.path.join(MODEL_DIR, "training.json")) as f:
        info = json.load(f)
    for key in ("steps", "seed", "final_loss", "heldout_recall_accuracy", "wall_time_s", "command"):
        assert key in info, key


def test_default_model_config(model):
    cfg, params = model
    assert cfg.family == "nemotron_h"
    assert cfg.vocab_size == ByteTokenizer.VOCAB_SIZE
    assert "mamba" in cfg.sublayers and "attention" in cfg.sublayers
    n = sum(x.size for x in __import__("jax").tree_util.tree_leaves(params))
    assert n <= 5_000_000


def test_recalls_facts_across_turns(model):
    cfg, params = model
    tok = ByteTokenizer()
    scored, wrong = 0, []
    for conv in CONVERSATIONS:
        for reply, expected in play(cfg, params, tok, conv):
            if expected is not None:
                scored += 1
                if reply != expected:
                    wrong.append((expected, reply))
    assert scored >= 20
    accuracy = 1 - len(wrong) / scored
    assert accuracy >= 0.8, f"recall accuracy {accuracy:.2f} over {scored} questions; wrong: {wrong}"
