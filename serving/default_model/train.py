"""Train the embedded default model: a tiny NemotronH-layout hybrid on a synthetic multi-turn memory chat task.

    python -m serving.default_model.train --out serving/default_model --steps 1000 --seed 0

Each conversation states one or two facts about the user (a name, a 3-digit number, a colour, a town, a pet's
name), the assistant acknowledges ("OK."), a few filler turns follow (small additions, chit-chat), then the
user asks for a fact and the assistant must answer with it ("Zora."). Names and towns are random letter strings
and numbers random 3-digit numbers, so the answer cannot be memorised: it has to be copied from an earlier turn.

Sequences are rendered with `ByteTokenizer().apply_chat_template` exactly as the server renders them; the loss
covers only assistant tokens (content and its closing `<|end|>`). Training is AdamW with linear warmup + cosine
decay and global-norm clipping, one jitted step, on CPU. Held-out recall accuracy is printed during training
(teacher-forced argmax over the answer tokens, which equals greedy decoding given the same history) and at the
end measured for real: turn-by-turn greedy generation through `hybrid_jax.generate_greedy` (the paged-cache
prefill/decode path the engine runs), with the model's own replies kept in the history.

Writes into --out: config.json + model.safetensors (`hybrid_jax.export.save_pretrained`), byte_tokenizer.json
and training.json (steps, seed, losses, accuracies, wall time, command).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_jax import forward, from_hf, generate_greedy
from hybrid_jax.export import save_pretrained
from hybrid_jax.loader import expected_shapes
from serving.tokenizer import ByteTokenizer

# ----------------------------------------------------------------------------------------------------------------
# Model config (NemotronH layout, byte vocabulary of serving.tokenizer.ByteTokenizer)
# ----------------------------------------------------------------------------------------------------------------

MODEL_CONFIG = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": 264,
    "hidden_size": 128,
    "hybrid_override_pattern": "M*-M*-",
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "attention_bias": False,
    "intermediate_size": 256,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "n_groups": 1,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "chunk_size": 16,
    "expand": 1,
    "mamba_hidden_act": "silu",
    "use_conv_bias": True,
    "use_bias": False,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 0.0001,
    "layer_norm_epsilon": 1e-5,
    "rms_norm_eps": 1e-5,
    "residual_in_fp32": False,
    "rescale_prenorm_residual": True,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 257,
    "eos_token_id": [262, 258],   # <|end|> closes a chat turn; <eos> ends raw text
    "pad_token_id": 256,
    "max_position_embeddings": 4096,
    "num_logits_to_keep": 1,
    "use_cache": True,
    "torch_dtype": "float32",
}

TOK = ByteTokenizer()
END = TOK.SPECIAL_TOKENS["<|end|>"]
ASSISTANT = TOK.SPECIAL_TOKENS["<|assistant|>"]
PAD = TOK.pad_token_id
MAX_LEN = 192  # tokens per training conversation (longer samples, ~7%, are redrawn)
BUCKETS = (128, 192)  # padded lengths of training batches (one jit compile each)

# ----------------------------------------------------------------------------------------------------------------
# Synthetic multi-turn memory chat data
# ----------------------------------------------------------------------------------------------------------------

_CONS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
COLOURS = ["red", "blue", "green", "teal", "pink", "black", "white", "orange", "purple", "yellow", "brown", "grey",
           "gold", "silver", "navy", "lime", "cyan", "maroon", "olive", "beige", "violet", "indigo", "coral", "amber"]


def random_name(rng: random.Random) -> str:
    """A capitalised pronounceable 4-6 letter name (alternating consonants and vowels): ~10^6 of them."""
    n = rng.randint(4, 6)
    first = rng.random() < 0.75  # most names start with a consonant
    s = "".join(rng.choice(_CONS if (i % 2 == 0) == first else _VOWELS) for i in range(n))
    return s.capitalize()


# kind -> (value generator, statements, questions)
FACTS = {
    "name": (random_name, ["My name is {v}.", "Hi, I am {v}.", "Call me {v}."],
             ["What is my name?", "What's my name?", "Who am I?"]),
    "number": (lambda r: str(r.randint(100, 999)), ["Remember the number {v}.", "My number is {v}.",
                                                    "Please remember {v}."],
               ["What is my number?", "What number did I give you?", "Which number should you remember?"]),
    "colour": (lambda r: r.choice(COLOURS), ["My favourite colour is {v}.", "I like the colour {v}.",
                                             "My favorite color is {v}."],
               ["What is my favourite colour?", "Which colour do I like?", "What is my favorite color?"]),
    "town": (random_name, ["I live in {v}.", "My home town is {v}."], ["Where do I live?", "What is my home town?"]),
    "pet": (random_name, ["My pet is called {v}.", "My dog's name is {v}."],
            ["What is my pet called?", "What is my pet's name?"]),
}
CHITCHAT = [("Hi!", "Hello!"), ("How are you?", "I am fine, thanks."), ("Thanks!", "You are welcome."),
            ("Do you like music?", "Yes, I do."), ("What can you do?", "I chat and remember things."),
            ("Is the sky blue?", "Yes."), ("Say hello.", "Hello."), ("What colour is grass?", "Green."),
            ("Is fire cold?", "No."), ("Good morning!", "Good morning!")]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly chatbot.", "Answer briefly."]


def filler_turn(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a}+{b}?", str(a + b)
    return rng.choice(CHITCHAT)


def make_conversation(rng: random.Random, two_facts: float = 0.5) -> tuple[list[dict], list[int]]:
    """(messages, indices of the assistant messages that answer a fact question)."""
    msgs: list[dict] = []
    if rng.random() < 0.15:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    kinds = rng.sample(sorted(FACTS), 2 if rng.random() < two_facts else 1)
    facts = {k: FACTS[k][0](rng) for k in kinds}
    # user turns before the questions: the first fact, then 0-3 fillers with the second fact (if any) among them
    body: list[tuple[str, str]] = [(rng.choice(FACTS[kinds[0]][1]).format(v=facts[kinds[0]]), "OK.")]
    rest = [filler_turn(rng) for _ in range(rng.choice([0, 1, 1, 2, 2, 3]))]
    if len(kinds) == 2:
        rest.insert(rng.randint(0, len(rest)), (rng.choice(FACTS[kinds[1]][1]).format(v=facts[kinds[1]]), "OK."))
    body += rest
    # 1-2 questions, each about a stated fact, possibly with a filler in between
    asked = [rng.choice(kinds)]
    if rng.random() < 0.35:
        asked.append(rng.choice(kinds))
    answers: list[int] = []
    for qi, k in enumerate(asked):
        for u, a in body:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        body = []
        if qi > 0 and rng.random() < 0.5:
            u, a = filler_turn(rng)
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": rng.choice(FACTS[k][2])})
        msgs.append({"role": "assistant", "content": f"{facts[k]}."})
        answers.append(len(msgs) - 1)
    return msgs, answers


def encode_conversation(msgs: list[dict], answers: list[int] = (), answer_weight: float = 1.0
                        ) -> tuple[list[int], list[float], list[tuple[int, int]]]:
    """(token ids, loss weight per id, [start, end) of each assistant message's content+<|end|>).

    Only assistant content and its <|end|> get weight: 1, or answer_weight for the messages listed in
    answers (the fact answers). The template renders each message as <|role|>content<|end|>, so per-message
    pieces concatenate to the full rendering; this is checked against apply_chat_template."""
    ids: list[int] = []
    mask: list[float] = []
    spans: list[tuple[int, int]] = []
    for j, m in enumerate(msgs):
        piece = TOK.apply_chat_template([m], add_generation_prompt=False, tokenize=True)
        if m["role"] == "assistant":
            spans.append((len(ids) + 1, len(ids) + len(piece)))
            w = answer_weight if j in answers else 1.0
            mask += [0.0] + [w] * (len(piece) - 1)  # not <|assistant|> itself: that is the generation prompt
        else:
            mask += [0.0] * len(piece)
        ids += piece
    assert ids == TOK.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True)
    return ids, mask, spans


def _pad_to_bucket(n: int) -> int:
    for b in BUCKETS:
        if n <= b:
            return b
    raise ValueError(n)


class BatchStream:
    """Padded training batches (tokens [B,T], loss mask [B,T] marking target tokens) of length-sorted
    conversations: a pool of `pool` batches is drawn, sorted by length and cut into batches padded to the
    smallest bucket, so little compute goes to padding."""

    def __init__(self, rng: random.Random, batch: int, answer_weight: float = 1.0, two_facts: float = 0.5,
                 pool: int = 8):
        self.rng, self.batch, self.pool, self.answer_weight = rng, batch, pool, answer_weight
        self.two_facts = two_facts
        self.queue: list[tuple[np.ndarray, np.ndarray]] = []

    def _refill(self):
        seqs = []
        while len(seqs) < self.batch * self.pool:
            ids, mask, _ = encode_conversation(*make_conversation(self.rng, self.two_facts), self.answer_weight)
            if len(ids) <= MAX_LEN:
                seqs.append((ids, mask))
        seqs.sort(key=lambda s: len(s[0]))
        batches = []
        for k in range(self.pool):
            chunk = seqs[k * self.batch:(k + 1) * self.batch]
            T = _pad_to_bucket(len(chunk[-1][0]))
            toks = np.full((self.batch, T), PAD, np.int32)
            msk = np.zeros((self.batch, T), np.float32)
            for i, (ids, mask) in enumerate(chunk):
                toks[i, :len(ids)] = ids
                msk[i, :len(ids)] = mask
            batches.append((toks, msk))
        self.rng.shuffle(batches)
        self.queue = batches

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.queue:
            self._refill()
        return self.queue.pop()


# ----------------------------------------------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------------------------------------------


def init_params(cfg, seed: int) -> dict:
    """Random params in our layout ([in, out] projections), Mamba2-style init for A_log / dt_bias / D / conv."""
    rng = np.random.default_rng(seed)
    n_layers = len(cfg.sublayers)
    out_scale = 1.0 / math.sqrt(2 * n_layers)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    layers = []
    for kind in cfg.sublayers:
        shapes = expected_shapes(cfg, kind)
        p = {"norm": np.ones(shapes["norm"], np.float32)}
        if kind == "mamba":
            D = cfg.hidden_size
            p["in_proj"] = normal(shapes["in_proj"], 1 / math.sqrt(D))
            W = cfg.d_conv
            p["conv_w"] = rng.uniform(-1 / math.sqrt(W), 1 / math.sqrt(W), shapes["conv_w"]).astype(np.float32)
            if cfg.conv_bias:
                p["conv_b"] = np.zeros(shapes["conv_b"], np.float32)
            H = cfg.mamba_heads
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), H))
            p["dt_bias"] = (dt + np.log(-np.expm1(-dt))).astype(np.float32)  # inverse softplus
            p["A_log"] = np.log(rng.uniform(1, 16, H)).astype(np.float32)
            p["D"] = np.ones(H, np.float32)
            p["norm_w"] = np.ones(shapes["norm_w"], np.float32)
            p["out_proj"] = normal(shapes["out_proj"], out_scale / math.sqrt(cfg.mamba_inner))
        elif kind == "attention":
            for n in ("q", "k", "v"):
                p[n] = normal(shapes[n], 1 / math.sqrt(cfg.hidden_size))
            p["o"] = normal(shapes["o"], out_scale / math.sqrt(shapes["o"][0]))
        else:
            p["up"] = normal(shapes["up"], 1 / math.sqrt(cfg.hidden_size))
            p["down"] = normal(shapes["down"], out_scale / math.sqrt(cfg.intermediate_size))
        layers.append(p)
    V, D = cfg.vocab_size, cfg.hidden_size
    params = {"embed": normal((V, D), 1.0), "final_norm": np.ones(D, np.float32), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((V, D), 1 / math.sqrt(D))
    return jax.tree_util.tree_map(jnp.asarray, params)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def make_train_step(cfg, optimizer):
    def loss_fn(params, toks, mask):
        logits = forward(params, cfg, toks[:, :-1])
        tgt = toks[:, 1:]
        m = mask[:, 1:]
        ll = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
        return jnp.sum(ll * m) / jnp.maximum(jnp.sum(m), 1.0)

    @jax.jit
    def step(params, opt_state, toks, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, toks, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    return step


def decay_mask(params):
    """Weight decay on the matrices (projections, embedding, lm_head) only; not on norms, biases, A_log, D,
    dt_bias or the conv taps."""
    return jax.tree_util.tree_map(lambda x: x.ndim == 2, params)


def heldout_set(seed: int, n: int) -> list[tuple[list[dict], list[int]]]:
    rng = random.Random(10_000_019 + seed)  # disjoint stream from the training one
    out = []
    while len(out) < n:
        msgs, ans = make_conversation(rng)
        if len(encode_conversation(msgs)[0]) <= MAX_LEN:
            out.append((msgs, ans))
    return out


def teacher_forced_recall(params, cfg, convs, batch: int = 64) -> float:
    """Fraction of fact answers whose every token (content + <|end|>) is the argmax given the gold history;
    exactly what greedy decoding of that turn would produce from the same history."""
    enc = [encode_conversation(m) for m, _ in convs]
    ok = total = 0
    for s in range(0, len(enc), batch):
        chunk = enc[s:s + batch]
        idx = list(range(s, s + len(chunk)))
        T = MAX_LEN
        toks = np.full((batch, T), PAD, np.int32)
        for i, (ids, _, _) in enumerate(chunk):
            toks[i, :len(ids)] = ids
        pred = np.asarray(jnp.argmax(forward(params, cfg, toks), -1))
        for i, (ids, _, spans) in enumerate(chunk):
            msgs, answers = convs[idx[i]]
            assistant_idx = [j for j, m in enumerate(msgs) if m["role"] == "assistant"]
            for j in answers:
                a, b = spans[assistant_idx.index(j)]
                total += 1
                ok += bool(np.all(pred[i, a - 1:b - 1] == np.asarray(ids[a:b])))
    return ok / max(total, 1)


def chat_greedy(params, cfg, msgs: list[dict], max_new_tokens: int = 32) -> list[str]:
    """Play the conversation turn by turn: every assistant message is replaced by the model's greedy reply
    (generated with hybrid_jax.generate_greedy, cut at <|end|>). Returns the model's replies in order.

    block_size=256 gives every sequence (<= 256 tokens) the same one-block cache, so the steps compile once."""
    history: list[dict] = []
    replies: list[str] = []
    for m in msgs:
        if m["role"] != "assistant":
            history.append(m)
            continue
        prompt = TOK.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        out = generate_greedy(params, cfg, prompt, max_new_tokens, block_size=256)
        if END in out:
            out = out[:out.index(END)]
        reply = TOK.decode(out)
        replies.append(reply)
        history.append({"role": "assistant", "content": reply})
    return replies


def greedy_recall(params, cfg, convs) -> tuple[float, float]:
    """(fact-answer accuracy, all-assistant-turn accuracy) under turn-by-turn greedy generation."""
    ok = total = turns_ok = turns = 0
    for msgs, answers in convs:
        replies = chat_greedy(params, cfg, msgs)
        assistant_idx = [j for j, m in enumerate(msgs) if m["role"] == "assistant"]
        for r, j in zip(replies, assistant_idx):
            good = r == msgs[j]["content"]
            turns += 1
            turns_ok += good
            if j in answers:
                total += 1
                ok += good
    return ok / max(total, 1), turns_ok / max(turns, 1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--answer-weight", type=float, default=3.0,
                    help="loss weight of the fact-answer tokens relative to other assistant tokens")
    ap.add_argument("--two-facts", type=float, default=0.5, help="fraction of conversations stating two facts")
    ap.add_argument("--config", default=None, help="HF config.json to train instead of the built-in one")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=256, help="held-out conversations for the teacher-forced check")
    ap.add_argument("--final-eval-n", type=int, default=200, help="held-out conversations for greedy generation")
    args = ap.parse_args(argv)

    t0 = time.time()
    hf = dict(MODEL_CONFIG)
    if args.config:
        with open(args.config) as f:
            hf = json.load(f)
    cfg = from_hf(hf)
    params = init_params(cfg, args.seed)
    n_params = count_params(params)
    print(f"model: {hf['hybrid_override_pattern']} hidden {cfg.hidden_size}, {n_params:,} params; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)

    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, max(args.steps, args.warmup + 1),
                                               end_value=args.lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(args.clip),
                            optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=args.weight_decay, mask=decay_mask))
    opt_state = optimizer.init(params)
    step_fn = make_train_step(cfg, optimizer)
    heldout = heldout_set(args.seed, args.eval_n)
    stream = BatchStream(random.Random(args.seed), args.batch, args.answer_weight, args.two_facts)

    history = []
    ema = None
    for step in range(1, args.steps + 1):
        toks, mask = stream.next()
        params, opt_state, loss, gnorm = step_fn(params, opt_state, jnp.asarray(toks), jnp.asarray(mask))
        if step % 25 == 0 or step == 1:
            loss = float(loss)
            ema = loss if ema is None else 0.8 * ema + 0.2 * loss
            print(f"step {step:5d}  loss {loss:.4f}  (ema {ema:.4f})  gnorm {float(gnorm):.2f}  "
                  f"lr {float(sched(step)):.2e}  T {toks.shape[1]}  {time.time() - t0:6.1f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = teacher_forced_recall(params, cfg, heldout)
            history.append({"step": step, "loss": float(loss), "heldout_recall_teacher_forced": acc,
                            "time_s": round(time.time() - t0, 1)})
            print(f"step {step:5d}  held-out recall (teacher-forced, {len(heldout)} convs): {acc:.3f}", flush=True)
    train_time = time.time() - t0

    # Final: real turn-by-turn greedy generation through the cached prefill/decode path.
    final_convs = heldout_set(args.seed + 1, args.final_eval_n)
    t1 = time.time()
    recall, turn_acc = greedy_recall(params, cfg, final_convs)
    print(f"held-out greedy recall ({len(final_convs)} convs, turn by turn): {recall:.3f}; "
          f"all assistant turns exact: {turn_acc:.3f}  ({time.time() - t1:.1f}s)", flush=True)

    save_pretrained(jax.device_get(params), hf, args.out, dtype=args.dtype)
    with open(os.path.join(args.out, "byte_tokenizer.json"), "w") as f:
        json.dump({"type": "byte"}, f)
        f.write("\n")
    saved_recall = recall
    if args.dtype != "float32":
        from hybrid_jax import load_pretrained
        _, reloaded = load_pretrained(args.out)
        saved_recall, _ = greedy_recall(reloaded, cfg, final_convs)
        print(f"held-out greedy recall of the saved {args.dtype} weights: {saved_recall:.3f}", flush=True)
    wall = time.time() - t0
    final_loss = history[-1]["loss"] if history else float("nan")
    info = {
        "command": "python -m serving.default_model.train " + " ".join(argv),
        "steps": args.steps, "seed": args.seed, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "clip": args.clip, "answer_weight": args.answer_weight,
        "two_facts": args.two_facts, "dtype": args.dtype,
        "num_params": n_params, "final_loss": final_loss,
        "loss_note": "mean cross-entropy over assistant tokens (content + <|end|>) of the last training batch, "
                     "fact-answer tokens weighted by answer_weight",
        "heldout_recall_accuracy": saved_recall,
        "heldout_recall_accuracy_float32": recall,
        "heldout_assistant_turn_accuracy": turn_acc,
        "heldout_conversations": len(final_convs),
        "eval_method": "turn-by-turn greedy generation with hybrid_jax.generate_greedy; a fact answer counts "
                       "when the reply equals the stated fact plus '.' exactly",
        "train_time_s": round(train_time, 1), "wall_time_s": round(wall, 1),
        "platform": f"jax {jax.__version__} {jax.devices()[0].platform}, {os.cpu_count()} cpus",
        "history": history,
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(f"saved to {args.out}: recall {saved_recall:.3f}, {n_params:,} params, wall {wall:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
