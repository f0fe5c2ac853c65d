"""Shared fixtures. A persistent JAX compilation cache makes repeated jit shapes (and server subprocesses) cheap."""
from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tests run tiny models: XLA's backend optimisations cost ~3x compile time and buy nothing measurable here.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import pytest  # noqa: E402


def write_tiny_byte_model(out_dir: str, seed: int = 0, layers=("mamba", "attention", "mlp", "mamba"),
                          **config) -> str:
    """A tiny random NemotronH checkpoint written by transformers, over the byte tokenizer's 264 ids. config:
    NemotronHConfig fields to override (e.g. the MoE sizes when `layers` has "moe")."""
    import torch
    from transformers import AutoModelForCausalLM, NemotronHConfig

    torch.manual_seed(seed)
    c = NemotronHConfig(vocab_size=264, hidden_size=64, layers_block_type=list(layers), num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=8,
                        mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=16,
                        eos_token_id=258, bos_token_id=257, pad_token_id=256, max_position_embeddings=4096,
                        **config)
    m = AutoModelForCausalLM.from_config(c).float().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "A_log" in n:
                p.copy_(torch.log(torch.rand_like(p) * 15 + 1))
            elif "dt_bias" in n:
                p.copy_(torch.randn_like(p) * 0.5 - 2)
            elif "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)  # discriminating logits: greedy choices are not near-ties
    m.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "byte_tokenizer.json"), "w") as f:
        json.dump({"type": "byte"}, f)
    return out_dir


def fail_prefill_steps(engine, when=lambda ints, T: True):
    """Make the engine's prefill steps fail as a device error does: the compiled program runs (and consumes the
    donated cache), then raises, for the steps whose packed ints (and chunk size T) satisfy `when`. Returns the
    function that undoes it."""
    programs = engine.runner.programs
    real_get = programs.get

    def get(shape):
        program = real_get(shape)
        if shape[0] != "prefill":
            return program

        def poisoned(params, cache, ints, *rest):
            out = program(params, cache, ints, *rest)
            if when(ints, shape[2]):
                raise RuntimeError("injected step failure: poisoned step")
            return out
        return poisoned
    programs.get = get
    return lambda: setattr(programs, "get", real_get)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_byte_model(str(tmp_path_factory.mktemp("tiny_byte_model")))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each test module's compiled programs when it ends. One pytest process runs every module; XLA maps
    each CPU executable into memory, and keeping every module's programs alive grows the process past Linux's
    65,530 memory mappings (vm.max_map_count), where loading the next executable segfaults."""
    yield
    import gc

    import jax

    from hybrid_jax import fused, model
    fused.make_serving_steps.cache_clear()
    model.make_steps.cache_clear()
    gc.collect()
    jax.clear_caches()


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server for the whole session (tests/pg_server.py); `pg_server.new_database()` gives each test
    an empty database. Fails, with what to install, where PostgreSQL is not installed."""
    from pg_server import PostgresUnavailable, postgres_server

    try:
        cm = postgres_server()
        server = cm.__enter__()
    except PostgresUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)
