"""Measure the default model on synthetic conversations it never saw, turn by turn, through the cached steps.

    python -m training.default_model.evaluate --split heldout --n 300 --seed 1

Each conversation is played as a chat client plays it: every assistant message is replaced by the model's own
greedy reply and stays in the history. The model runs on the paged cache of `hybrid_jax.make_steps` (prefill,
decode), and each turn computes only the tokens after the ones already in the cache, as the engine does.

Scores: `recall` is the share of fact questions whose reply is exactly the expected one ("Marcus.", or "You have
not told me." for a fact never stated); `small_talk_exact` the share of small-talk replies equal to the
expected one where one is defined; `small_talk_leaks` the share of small-talk replies that contain a stated
fact's value (a fact pulled out where none was asked for).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys

import jax.numpy as jnp
import numpy as np

from hybrid_jax import SpanBatch, init_cache, make_steps
from training.default_model import data as D
from serving.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
END = TOK.SPECIAL_TOKENS["<|end|>"]
STOP = set(TOK.eos_token_ids)
MAX_REPLY = 80


def _bucket(n: int) -> int:
    b = 16
    while b < n:
        b *= 2
    return b


class CachedChat:
    """One sequence on its own paged cache (slot 1, blocks 1..M): feed tokens, then decode greedily."""

    def __init__(self, params, cfg, max_len: int = 1024, block_size: int = 64):
        m = -(-max_len // block_size)
        self.params, self.max_len = params, max_len
        self.cache = init_cache(cfg, num_blocks=m + 1, block_size=block_size, num_slots=2,
                                dtype=params["embed"].dtype)
        self.table = jnp.arange(1, m + 1, dtype=jnp.int32)[None]
        self.prefill, _, self.decode = make_steps(cfg)
        self.ids: list[int] = []  # the tokens in the cache

    def _batch(self, toks: list[int], pad_to: int) -> SpanBatch:
        t = np.zeros((1, pad_to), np.int32)
        t[0, :len(toks)] = toks
        return SpanBatch(tokens=jnp.asarray(t), start=jnp.array([len(self.ids)], jnp.int32),
                         length=jnp.array([len(toks)], jnp.int32), slot=jnp.array([1], jnp.int32),
                         block_table=self.table)

    def reply(self, prompt: list[int]) -> list[int]:
        """Greedy reply to `prompt`, without the stop token. Only the tokens after the cached ones run; a prompt
        that does not continue them (a reply whose bytes are not valid UTF-8 renders differently) starts over."""
        if prompt[:len(self.ids)] != self.ids:
            self.ids = []  # start 0: the steps begin from zero state
        new = prompt[len(self.ids):]
        logits, self.cache = self.prefill(self.params, self.cache, self._batch(new, _bucket(len(new))))
        self.ids += new
        out: list[int] = []
        while len(self.ids) < self.max_len - 1:
            tok = int(jnp.argmax(logits[0]))
            if tok in STOP or len(out) == MAX_REPLY:
                break
            out.append(tok)
            logits, self.cache = self.decode(self.params, self.cache, self._batch([tok], 1))
            self.ids.append(tok)
        return out


def play(params, cfg, messages: list[dict]) -> list[str]:
    """The model's replies, turn by turn, in place of the assistant messages of `messages`."""
    chat = CachedChat(params, cfg)
    history: list[dict] = []
    replies: list[str] = []
    for m in messages:
        if m["role"] != "assistant":
            history.append(m)
            continue
        prompt = TOK.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        reply = TOK.decode(chat.reply(prompt))
        replies.append(reply)
        history.append({"role": "assistant", "content": reply})
    return replies


def mentions(text: str, value: str) -> bool:
    """Whether `value` occurs in `text` as a whole word (case-insensitive)."""
    return re.search(r"(?<!\w)" + re.escape(value.lower()) + r"(?!\w)", text.lower()) is not None


def score(conv: D.Conversation, replies: list[str]) -> dict[str, int]:
    """Counts of one played conversation (see the module docstring)."""
    c = dict(questions=0, recalled=0, small_talk=0, small_talk_exact=0, small_talk_scored=0, leaks=0)
    assistant_idx = [j for j, m in enumerate(conv.messages) if m["role"] == "assistant"]
    values = [v for k, v in conv.facts.items() if k != "species"]
    for j, reply, want in zip(assistant_idx, replies, conv.expected):
        if j in conv.answers:
            c["questions"] += 1
            c["recalled"] += reply == want
            continue
        if any(mentions(want or "", v) for v in values):
            continue  # an acknowledgement that repeats the fact ("Nice to meet you, Marcus.")
        c["small_talk"] += 1
        c["leaks"] += any(mentions(reply, v) for v in values)
        if want is not None:
            c["small_talk_scored"] += 1
            c["small_talk_exact"] += reply == want
    return c


def conversations(seed: int, n: int, split: str, max_tokens: int = 320) -> list[D.Conversation]:
    rng = random.Random(f"{split}-{seed}")
    out = []
    while len(out) < n:
        conv = D.make_conversation(rng, split)
        if len(TOK.apply_chat_template(conv.messages, tokenize=True)) <= max_tokens:
            out.append(conv)
    return out


def evaluate(params, cfg, convs: list[D.Conversation], examples: int = 0) -> dict:
    total: dict[str, int] = {}
    wrong = []
    for conv in convs:
        replies = play(params, cfg, conv.messages)
        for k, v in score(conv, replies).items():
            total[k] = total.get(k, 0) + v
        assistant_idx = [j for j, m in enumerate(conv.messages) if m["role"] == "assistant"]
        for j, r, want in zip(assistant_idx, replies, conv.expected):
            if want is not None and r != want and len(wrong) < examples:
                wrong.append({"user": conv.messages[j - 1]["content"], "expected": want, "got": r})
    out = {"conversations": len(convs), "questions": total["questions"],
           "recall": total["recalled"] / max(total["questions"], 1),
           "small_talk_replies": total["small_talk"],
           "small_talk_exact": total["small_talk_exact"] / max(total["small_talk_scored"], 1),
           "small_talk_leaks": total["leaks"] / max(total["small_talk"], 1)}
    if examples:
        out["wrong_examples"] = wrong
    return out


def main(argv: list[str] | None = None) -> int:
    from hybrid_jax import load_pretrained
    from serving.default_model import MODEL_DIR

    ap = argparse.ArgumentParser(prog="python -m training.default_model.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL_DIR, help="checkpoint directory (default: the shipped model)")
    ap.add_argument("--split", choices=("heldout", "train"), default="heldout",
                    help="heldout: unseen phrasings and words; train: training phrasings, fresh values")
    ap.add_argument("--n", type=int, default=300, help="conversations")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--examples", type=int, default=10, help="wrong replies to print")
    args = ap.parse_args(argv)
    cfg, params = load_pretrained(args.model)
    print(json.dumps(evaluate(params, cfg, conversations(args.seed, args.n, args.split), args.examples), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
