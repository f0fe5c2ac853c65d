"""Saved state is bound to what produced it: weights, dtype, config, tokenizer and template, block size, mode.
A mismatch restores nothing (and says why); state files are the owner's only; stale leftovers are removed."""
from __future__ import annotations

import logging
import os
import shutil
import stat

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from serving import Engine

KW = dict(max_model_len=256)


def _turns(engine, cid="c"):
    return [engine.complete(p, conversation_id=cid, cache_salt="s", max_tokens=6, temperature=0)
            for p in ([1, 2, 3, 4, 5, 6], [7, 8, 9])]


def test_saved_state_restores_only_into_the_same_setup(tiny_model_dir, tmp_path, caplog):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, model)
    state = str(tmp_path / "state")
    e = Engine.from_pretrained(model, **KW)
    first = _turns(e)
    e.save_state(state)
    e.shutdown()
    # owner-only files; a leftover of an interrupted save is removed at the next start
    for root, dirs, files in os.walk(state):
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o600, name
    os.makedirs(os.path.join(state, "state-1.orbax-checkpoint-tmp-7"))

    same = Engine.from_pretrained(model, **KW)
    assert same.load_state(state) is True
    assert not any("tmp" in n for n in os.listdir(state))
    nxt = same.complete([10, 11], conversation_id="c", cache_salt="s", max_tokens=4, temperature=0)
    assert nxt.cached_tokens == first[-1].prompt_tokens + first[-1].completion_tokens - 1
    same.shutdown()

    other_dtype = Engine.from_pretrained(model, dtype="bfloat16", **KW)
    with caplog.at_level(logging.WARNING, logger="serving.persist"):
        assert other_dtype.load_state(state) is False
    assert "dtype" in caplog.text
    other_dtype.shutdown()

    weights = os.path.join(model, "model.safetensors")  # perturb one tensor, same directory, same shapes
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.float32(1e-3)
    save_file(tensors, weights, metadata={"format": "pt"})
    caplog.clear()
    perturbed = Engine.from_pretrained(model, **KW)
    with caplog.at_level(logging.WARNING, logger="serving.persist"):
        assert perturbed.load_state(state) is False
    assert "weights" in caplog.text and "dtype" not in caplog.text
    fresh = Engine.from_pretrained(model, **KW)
    try:
        got, want = _turns(perturbed), _turns(fresh)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert got[0].cached_tokens == 0
    finally:
        perturbed.shutdown()
        fresh.shutdown()


def test_cache_dir_is_owned_and_foreign_files_survive(tmp_path):
    """--cache-dir removes only its own leftovers, and refuses a non-empty directory it did not create."""
    from serving import persist
    foreign = tmp_path / "foreign"
    (foreign / "backup_tmp_dir").mkdir(parents=True)
    (foreign / "my_tmp_notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not created by this server.*backup_tmp_dir"):
        persist.claim(str(foreign))
    assert sorted(os.listdir(foreign)) == ["backup_tmp_dir", "my_tmp_notes.txt"]

    own = tmp_path / "own"
    persist.claim(str(own))                       # new: created owner-only, with its marker
    assert stat.S_IMODE(os.stat(own).st_mode) == 0o700 and persist.MARKER in os.listdir(own)
    (own / "LATEST").write_text("state-2")
    for name in ("state-1.orbax-checkpoint-tmp-7", "state-2"):
        (own / name).mkdir()
    for name in ("state-1.json", "state-2.json", "LATEST.tmp", ".responses.json.12.34.tmp", "my_tmp_notes.txt"):
        (own / name).write_text("x")
    (own / "backup_tmp_dir").mkdir()
    persist.claim(str(own))                       # marked: taken whatever else it holds
    removed = persist.clean_stale(str(own))
    assert sorted(removed) == sorted(["state-1.orbax-checkpoint-tmp-7", "state-1.json", "LATEST.tmp",
                                      ".responses.json.12.34.tmp"])
    assert {"my_tmp_notes.txt", "backup_tmp_dir", "state-2", "state-2.json", "LATEST"} <= set(os.listdir(own))

    legacy = tmp_path / "legacy"                  # an older version's dir (no marker, only its own names)
    legacy.mkdir()
    (legacy / "LATEST").write_text("state-5")
    (legacy / "responses.json").write_text("{}")
    persist.claim(str(legacy))
    assert persist.MARKER in os.listdir(legacy)
