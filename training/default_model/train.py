"""Train the embedded default model: a small NemotronH-layout hybrid on synthetic multi-turn chats with memory.

    python -m training.default_model.train --out serving/default_model

The conversations come from `training.default_model.data`: facts about the user stated in many phrasings, small
talk in between, questions about the facts; wide word lists and random strings and numbers as values. They are
rendered with `ByteTokenizer().apply_chat_template` exactly as the server renders them; the loss covers only
the assistant's tokens (content and its closing `<|end|>`), the answers to fact questions weighted higher.
The first `--short-steps` steps see short conversations (at most two facts, no small talk): cheap steps in which
the model learns to copy a value from an earlier turn; the rest see the full mix. Training is AdamW with linear
warmup, cosine decay and global-norm clipping, one jitted step through `hybrid_jax.forward`, on CPU.

During training, recall on held-out conversations is checked teacher-forced (argmax over the answer tokens given
the true history). At the end it is measured for real with `training.default_model.evaluate`: turn by turn, the
model's own greedy replies kept in the history, through the paged-cache steps the engine runs, on conversations
built only from held-out phrasings and words.

Writes into --out: config.json + model.safetensors (`hybrid_jax.export.save_pretrained`), byte_tokenizer.json and
training.json (command, hyper-parameters, losses, accuracies, wall time).
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

from hybrid_jax import forward, from_hf
from hybrid_jax.export import save_pretrained
from hybrid_jax.loader import expected_shapes
from serving.default_model import MODEL_DIR
from training.default_model import data as D
from training.default_model import evaluate as E
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
PAD = TOK.pad_token_id
MAX_LEN = 320  # tokens per training conversation (longer ones, ~7%, are redrawn)
BUCKETS = (128, 192, 256, 320)  # padded lengths of training batches (one jit compile each)

# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def encode_conversation(conv: D.Conversation, answer_weight: float = 1.0) -> tuple[list[int], list[float]]:
    """(token ids, loss weight per id). Only assistant content and its <|end|> get weight: answer_weight for the
    answers to fact questions, 1 for the rest. The template renders each message as <|role|>content<|end|>, so
    per-message pieces concatenate to the full rendering (checked against apply_chat_template)."""
    ids: list[int] = []
    mask: list[float] = []
    for j, m in enumerate(conv.messages):
        piece = TOK.apply_chat_template([m], add_generation_prompt=False, tokenize=True)
        if m["role"] == "assistant":
            w = answer_weight if j in conv.answers else 1.0
            mask += [0.0] + [w] * (len(piece) - 1)  # not <|assistant|> itself: that is the generation prompt
        else:
            mask += [0.0] * len(piece)
        ids += piece
    assert ids == TOK.apply_chat_template(conv.messages, add_generation_prompt=False, tokenize=True)
    return ids, mask


def _pad_to_bucket(n: int) -> int:
    return next(b for b in BUCKETS if n <= b)


def _pad_batch(seqs: list[tuple[list[int], list[float]]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    T = _pad_to_bucket(max(len(ids) for ids, _ in seqs))
    toks = np.full((rows, T), PAD, np.int32)
    msk = np.zeros((rows, T), np.float32)
    for i, (ids, mask) in enumerate(seqs):
        toks[i, :len(ids)] = ids
        msk[i, :len(ids)] = mask
    return toks, msk


class BatchStream:
    """Padded training batches (tokens [B,T], loss weights [B,T]) of length-sorted conversations: a pool of
    `pool` batches is drawn, sorted by length and cut into batches padded to the smallest bucket, so little
    compute goes to padding."""

    def __init__(self, rng: random.Random, batch: int, answer_weight: float, pool: int = 8):
        self.rng, self.batch, self.pool, self.answer_weight = rng, batch, pool, answer_weight
        self.queue: list[tuple[np.ndarray, np.ndarray]] = []
        self.short = False  # short conversations (see data.make_conversation)

    def _draw(self) -> tuple[list[int], list[float]]:
        while True:
            enc = encode_conversation(D.make_conversation(self.rng, "train", self.short), self.answer_weight)
            if len(enc[0]) <= MAX_LEN:
                return enc

    def _refill(self):
        seqs = sorted((self._draw() for _ in range(self.batch * self.pool)), key=lambda s: len(s[0]))
        self.queue = [_pad_batch(seqs[k * self.batch:(k + 1) * self.batch], self.batch) for k in range(self.pool)]
        self.rng.shuffle(self.queue)

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


def make_optimizer(args, steps: int):
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, max(steps, args.warmup + 1),
                                               end_value=args.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(args.clip),
                      optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=args.weight_decay, mask=decay_mask))
    return opt, sched


def teacher_forced_recall(params, cfg, convs: list[D.Conversation], batch: int = 32) -> float:
    """Share of fact answers whose every token (content + <|end|>) is the argmax given the true history:
    what greedy decoding of that turn would produce from that history."""
    ok = total = 0
    for s in range(0, len(convs), batch):
        chunk = convs[s:s + batch]
        enc = [encode_conversation(c, answer_weight=2.0) for c in chunk]  # weight 2 marks the answer tokens
        toks, msk = _pad_batch(enc, batch)
        pred = np.asarray(jnp.argmax(forward(params, cfg, toks), -1))
        for i, (ids, mask) in enumerate(enc):
            answer = np.asarray(mask) == 2.0
            pos = np.flatnonzero(answer)
            # group the answer positions into answers (runs of consecutive positions)
            for run in np.split(pos, np.flatnonzero(np.diff(pos) > 1) + 1):
                if len(run):
                    total += 1
                    ok += bool(np.all(pred[i, run - 1] == np.asarray(ids)[run]))
    return ok / max(total, 1)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.default_model.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=MODEL_DIR, help="output directory (default: serving/default_model, the "
                    "shipped model)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--short-steps", type=int, default=500,
                    help="first steps on short conversations (two facts at most, no small talk): cheaper steps "
                         "in which copying from earlier turns is learnt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="conversations per step")
    ap.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=80)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--answer-weight", type=float, default=3.0,
                    help="loss weight of the fact-answer tokens relative to other assistant tokens")
    ap.add_argument("--config", default=None, help="HF config.json to train instead of the built-in one")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-n", type=int, default=64, help="held-out conversations for the teacher-forced check")
    ap.add_argument("--final-eval-n", type=int, default=200,
                    help="conversations played turn by turn at the end, per split")
    return ap.parse_args(argv)


def train(args, cfg, params, t0: float):
    """The training loop; returns (params, history of evaluations, last loss)."""
    optimizer, sched = make_optimizer(args, args.steps)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(cfg, optimizer)
    heldout = E.conversations(args.seed, args.eval_n, "heldout")
    stream = BatchStream(random.Random(args.seed), args.batch, args.answer_weight)
    history, ema, loss = [], None, float("nan")
    for step in range(1, args.steps + 1):
        if stream.short != (step <= args.short_steps):
            stream.short, stream.queue = step <= args.short_steps, []
        toks, mask = stream.next()
        params, opt_state, loss, gnorm = step_fn(params, opt_state, jnp.asarray(toks), jnp.asarray(mask))
        if step % 25 == 0 or step == 1:
            loss = float(loss)
            ema = loss if ema is None else 0.8 * ema + 0.2 * loss
            print(f"step {step:5d}  loss {loss:.4f}  (ema {ema:.4f})  gnorm {float(gnorm):.2f}  "
                  f"lr {float(sched(step)):.2e}  T {toks.shape[1]}  {time.time() - t0:6.1f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = teacher_forced_recall(params, cfg, heldout)
            history.append({"step": step, "loss": float(loss), "heldout_recall_teacher_forced": round(acc, 4),
                            "time_s": round(time.time() - t0, 1)})
            print(f"step {step:5d}  held-out recall (teacher-forced, {len(heldout)} convs): {acc:.3f}", flush=True)
    return params, history, float(loss)


def final_evaluation(params, cfg, args) -> dict:
    """Turn-by-turn greedy play on fresh conversations: held-out phrasings and words, and training phrasings
    with fresh values."""
    out = {}
    for split in ("heldout", "train"):
        t = time.time()
        convs = E.conversations(args.seed + 1, args.final_eval_n, split)
        out[split] = E.evaluate(params, cfg, convs, examples=8)
        out[split]["time_s"] = round(time.time() - t, 1)
        print(f"{split}: {json.dumps(out[split])}", flush=True)
    return out


def save(params, hf: dict, args, info: dict) -> None:
    save_pretrained(jax.device_get(params), hf, args.out, dtype=args.dtype)
    with open(os.path.join(args.out, "byte_tokenizer.json"), "w") as f:
        json.dump({"type": "byte"}, f)
        f.write("\n")
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
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
    params, history, loss = train(args, cfg, params, t0)
    train_time = time.time() - t0
    if args.dtype != "float32":  # evaluate what is shipped: the weights rounded to the saved dtype
        params = jax.tree_util.tree_map(lambda x: x.astype(args.dtype).astype(jnp.float32) if x.ndim > 1 else x,
                                        params)
    evaluation = final_evaluation(params, cfg, args)
    wall = time.time() - t0
    info = {
        "command": "python -m training.default_model.train " + " ".join(argv),
        **{k: getattr(args, k) for k in ("steps", "short_steps", "seed", "batch", "lr", "warmup", "weight_decay",
                                         "clip", "answer_weight", "dtype")},
        "num_params": n_params, "final_loss": loss,
        "loss_note": "mean cross-entropy over assistant tokens (content + <|end|>) of the last training batch, "
                     "fact-answer tokens weighted by answer_weight",
        "heldout_recall_accuracy": evaluation["heldout"]["recall"],
        "evaluation": evaluation,
        "eval_method": "training.default_model.evaluate: turn-by-turn greedy play through the paged-cache steps, "
                       "the model's own replies kept in the history; a fact answer counts when the reply equals "
                       "the expected one exactly",
        "train_time_s": round(train_time, 1), "wall_time_s": round(wall, 1),
        "cpu_time_s": round(time.process_time(), 1),
        "load_average_at_end": os.getloadavg(),
        "platform": f"jax {jax.__version__} {jax.devices()[0].platform}, {os.cpu_count()} cpus",
        "history": history,
    }
    save(params, hf, args, info)
    print(f"saved to {args.out}: held-out recall {info['heldout_recall_accuracy']:.3f}, {n_params:,} params, "
          f"wall {wall:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
