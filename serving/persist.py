"""Durable committed state: save on graceful shutdown, restore on start.

Layout under the cache dir: `state-<n>/` (orbax-checkpoint arrays: the committed KV blocks and Mamba slots),
`state-<n>.json` (the conversations, and the checkpoints: salt, token ids and their digest, owner, head, and where
their blocks and slots sit in the arrays) and `LATEST`
(the name of the last complete state). LATEST is replaced atomically only after both are fully written, so a
crash mid-save leaves the previous good state (or none) to load.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hybrid_jax import ledger as L
from hybrid_jax.cache import Cache, MambaState, PagedKV
from serving.checkpoints import Checkpoint, digest
from serving.conversations import Conversation
from serving.store import ConversationRecord
from serving.fingerprint import differences, fingerprint

log = logging.getLogger("serving.persist")
FORMAT = 3
MEMO = "weights-digest.json"  # remembered digests of the weight files (see serving/fingerprint.py)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _owner_only(path: str) -> None:
    """State files hold every tenant's messages: readable by the owner only."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)


# Everything this server writes in a cache dir, and the leftovers of an interrupted write (orbax's temporary
# folders, `.tmp` files); nothing else there is ever removed.
MARKER = ".hybrid-serve"
_OWN = re.compile(r"^(LATEST|responses\.json|weights-digest\.json|state-\d+(\.json)?|state\.db(-wal|-shm|-journal)?|"
                  r"states|" + re.escape(MARKER) + ")$")
_LEFTOVER = re.compile(r"^(state-\d+\.orbax-checkpoint-tmp-.*|(state-\d+\.json|LATEST|weights-digest\.json)\.tmp|"
                       r"\.responses\.json\.\d+\.\d+\.tmp)$")


def claim(directory: str) -> None:
    """Make `directory` this server's cache dir: create it (owner-only) with its marker file, or take one that
    has the marker or holds only what this server writes (an older version's, which wrote no marker). A
    non-empty directory with anything else in it is refused (ValueError): the server deletes its own leftovers
    there, so it never shares a directory with other files."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    names = os.listdir(directory)
    if MARKER not in names:
        foreign = sorted(n for n in names if not (_OWN.match(n) or _LEFTOVER.match(n)))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise ValueError(f"--cache-dir {directory} is not empty and was not created by this server ({shown}); "
                             "give it an empty or new directory")
        _atomic_write(os.path.join(directory, MARKER), json.dumps({"format": FORMAT}))


def clean_stale(directory: str) -> list[str]:
    """Remove what an interrupted save left behind: this server's temporary files and folders, and states other
    than the one LATEST names. Returns the removed names."""
    latest = _latest(directory)
    removed = []
    for name in os.listdir(directory):
        old_state = (name.startswith("state-") and _OWN.match(name) and latest is not None
                     and name not in (latest, latest + ".json"))
        if _LEFTOVER.match(name) or old_state:
            path = os.path.join(directory, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _remove(path)
            removed.append(name)
    return removed


def save(engine, directory: str) -> str:
    """Write the committed conversations and device checkpoints of `engine`; returns the state name. Runs on the
    engine thread."""
    directory = os.path.abspath(directory)
    claim(directory)
    clean_stale(directory)
    name = f"state-{time.time_ns()}"
    caches = engine.caches
    turns = dict(caches.ledger.turns)
    blocks = sorted({b for t in turns.values() for b in t.blocks})
    slots = [t.slot for t in turns.values()]
    bpos = {b: i for i, b in enumerate(blocks)}
    ckpts = []
    for i, (cid, t) in enumerate(turns.items()):
        ck = caches.index.meta[cid]
        ckpts.append({"cid": cid, "salt": ck.salt, "tokens": ck.tokens.tolist(), "digest": ck.digest.hex(),
                      "owner": None if ck.owner is None else list(ck.owner), "boundary": ck.boundary,
                      "blocks": [bpos[b] for b in t.blocks], "slot": i})
    heads = [[k[0], k[1], cid] for k, cid in caches.index.heads.items() if cid in turns]
    convs = [{"salt": key[0], "id": key[1], "messages": conv.messages, "seen": conv.seen, "ids": conv.ids,
              "turns": conv.turns, "last_used": conv.last_used} for key, conv in engine.conversations.items()
             if engine.conversations.journal is None]  # with a state database, the conversations are there
    meta = {"format": FORMAT, "model": engine.model_name, "block_size": engine.block_size,
            "cache_mode": engine.cache_mode, "num_blocks": len(blocks), "num_slots": len(slots),
            "fingerprint": fingerprint(engine, os.path.join(directory, MEMO)),
            "conversations": convs, "checkpoints": ckpts, "heads": heads}
    if slots:
        c = caches.cache
        b, s = jnp.asarray(blocks), jnp.asarray(slots)
        arrays = jax.device_get({"k": c.kv.k[:, b], "v": c.kv.v[:, b], "conv": c.mamba.conv[:, s],
                                 "ssm": c.mamba.ssm[:, s]})
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(directory, name), {k: np.asarray(v) for k, v in arrays.items()})
        ckpt.wait_until_finished()
        _owner_only(os.path.join(directory, name))
    _atomic_write(os.path.join(directory, name + ".json"), json.dumps(meta))
    previous = _latest(directory)
    _atomic_write(os.path.join(directory, "LATEST"), name)
    if previous and previous != name:
        shutil.rmtree(os.path.join(directory, previous), ignore_errors=True)
        _remove(os.path.join(directory, previous + ".json"))
    log.info("saved %d conversations and %d checkpoints (%d KV blocks, %d slots) to %s", len(convs), len(ckpts),
             len(blocks), len(slots), directory)
    return name


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _latest(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, "LATEST")) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def load(engine, directory: str) -> bool:
    """Restore the last complete state into a fresh engine. Returns False (and loads nothing) if there is none
    or it does not fit this engine."""
    removed = clean_stale(os.path.abspath(directory))
    if removed:
        log.info("removed %d stale entries an interrupted save left in %s", len(removed), directory)
    name = _latest(os.path.abspath(directory))
    if name is None:
        return False
    try:
        with open(os.path.join(directory, name + ".json")) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            log.warning("cache state in %s has format %s, not %s; starting empty", directory, meta.get("format"),
                        FORMAT)
            return False
        diff = differences(meta.get("fingerprint"), fingerprint(engine, os.path.join(directory, MEMO)))
        if diff:
            log.warning("cache state in %s was saved by another model setup (%s differ); starting empty",
                        directory, ", ".join(diff))
            return False
        arrays = None
        if meta["num_slots"]:
            arrays = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(directory, name)))
        _install(engine, meta, arrays)
    except Exception:
        log.exception("could not load cache state %s from %s; starting empty", name, directory)
        return False
    log.info("restored %d conversations from %s", len(meta["conversations"]), directory)
    return True


def _install(engine, meta: dict, arrays) -> None:
    caches = engine.caches
    led = caches.ledger
    rc, slots = led.refcount.copy(), led.slots.copy()
    new_blocks = L.alloc_blocks(rc, meta["num_blocks"])
    new_slots = []
    for _ in range(meta["num_slots"]):
        s = L.alloc_slot(slots)
        slots[s] = L.SLOT_COMMITTED
        new_slots.append(s)
    c = caches.cache
    if arrays is not None:
        b, s = jnp.asarray(new_blocks), jnp.asarray(new_slots)
        c = Cache(kv=PagedKV(k=c.kv.k.at[:, b].set(arrays["k"]), v=c.kv.v.at[:, b].set(arrays["v"])),
                  mamba=MambaState(conv=c.mamba.conv.at[:, s].set(arrays["conv"]),
                                   ssm=c.mamba.ssm.at[:, s].set(arrays["ssm"])))
    journal = engine.conversations.journal
    for conv in meta["conversations"] if journal is None else ():  # the state database's are the truth
        engine.conversations.restore((conv["salt"], conv["id"]), Conversation(
            conv["messages"], conv["ids"], conv["turns"], conv["last_used"], seen=conv.get("seen")))
    live: dict = {}  # with a state database: whether each owner is still a conversation there (not deleted since)

    def kept(owner) -> bool:
        if journal is None or owner is None:
            return True
        if owner not in live:
            live[owner] = isinstance(journal.load(owner), ConversationRecord)
        return live[owner]
    turns, cids = {}, {}
    for ck in meta["checkpoints"]:
        tokens = np.asarray(ck["tokens"], np.int32)
        if digest(tokens).hex() != ck["digest"]:
            log.warning("checkpoint %s: token digest mismatch; not restored", ck["cid"])
            continue
        owner = None if ck["owner"] is None else tuple(ck["owner"])
        if not kept(owner):  # its conversation was deleted or forgotten after this state was saved
            continue
        cid = cids[ck["cid"]] = caches.index.new_id()
        caches.index.add(Checkpoint(cid, ck["salt"], tokens, digest(tokens), owner, boundary=ck["boundary"]))
        turns[cid] = L.Turn(len(tokens), tuple(new_blocks[i] for i in ck["blocks"]), new_slots[ck["slot"]], 0)
    for salt, conv_id, old in meta["heads"]:
        if old in cids:
            caches.index.set_head((salt, conv_id), cids[old])
    # slots and blocks of skipped checkpoints go back to the pool
    keep = {s for t in turns.values() for s in [t.slot]}
    for s in new_slots:
        if s not in keep:
            slots[s] = L.SLOT_FREE
    used = collections.Counter(b for t in turns.values() for b in t.blocks)
    for b in new_blocks:
        rc[b] = used.get(b, 0)
    caches.cache = c
    caches.ledger = led.replace(refcount=rc, slots=slots, turns=turns)
