"""Pallas kernels (interpret mode on CPU) against the plain-jnp references, plus dispatch and a Triton lowering check.

Shapes are tiny and few (each distinct shape is a compile; interpret mode is slow), the whole file runs in well
under 90 s on 2 CPU cores.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import conv1d, ops, reference, ssd, ssm_update
from pallas_kernels import paged_attention as pa

TOL = dict(rtol=1e-4, atol=1e-4)

# jitted references: one compile per shape is much cheaper than op-by-op eager dispatch
REF = SimpleNamespace(
    ssd_scan=jax.jit(reference.ssd_scan, static_argnames=("chunk_size", "return_chunk_states")),
    ssm_decode_step=jax.jit(reference.ssm_decode_step),
    causal_conv1d=jax.jit(reference.causal_conv1d),
    causal_conv1d_step=jax.jit(reference.causal_conv1d_step),
    paged_prefill_attention=jax.jit(reference.paged_prefill_attention, static_argnames=("scale",)),
    paged_decode_attention=jax.jit(reference.paged_decode_attention, static_argnames=("scale",)),
)


def _rng(seed):
    return np.random.default_rng(seed)


def _f32(rng, *shape, scale=1.0):
    return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32))


def _close(got, want, **tol):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **(tol or TOL))


# --------------------------------------------------------------------------------------------------------------- SSD

def _ssd_inputs(seed, Bsz, T, H, P, G, N):
    rng = _rng(seed)
    x = _f32(rng, Bsz, T, H, P)
    dt = jnp.asarray(rng.uniform(0.01, 0.6, (Bsz, T, H)).astype(np.float32))
    A = -jnp.asarray(rng.uniform(0.2, 2.0, (H,)).astype(np.float32))
    B = _f32(rng, Bsz, T, G, N, scale=0.5)
    C = _f32(rng, Bsz, T, G, N, scale=0.5)
    init = _f32(rng, Bsz, H, P, N)
    return x, dt, A, B, C, init


# B=2, T=48 = 3 chunks of 16, H=4 heads over G=2 groups, P=12 (not a power of 2: padded to the 16-wide block), N=16
SSD_SHAPE = dict(Bsz=2, T=48, H=4, P=12, G=2, N=16)
SSD_L = 16


def test_ssd_scan_matches_reference_with_init_state_and_chunk_states():
    x, dt, A, B, C, init = _ssd_inputs(0, **SSD_SHAPE)
    want = REF.ssd_scan(x, dt, A, B, C, init, chunk_size=SSD_L, return_chunk_states=True)
    got = ssd.ssd_scan(x, dt, A, B, C, init, chunk_size=SSD_L, return_chunk_states=True, interpret=True)
    assert len(got) == 3
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32
        _close(g, w)


def test_ssd_scan_without_chunk_states_and_padding_leaves_state_unchanged():
    x, dt, A, B, C, init = _ssd_inputs(1, **SSD_SHAPE)
    # row 1 is a ragged span of 27 tokens: dt = 0 (and garbage x / B / C) at the 21 padding positions
    valid = 27
    pad = jnp.arange(SSD_SHAPE["T"]) >= valid
    dt = dt.at[1].set(jnp.where(pad[:, None], 0.0, dt[1]))
    x = x.at[1].set(jnp.where(pad[:, None, None], 1e3, x[1]))
    y, final = ssd.ssd_scan(x, dt, A, B, C, init, chunk_size=SSD_L, interpret=True)
    y_ref, final_ref = REF.ssd_scan(x, dt, A, B, C, init, chunk_size=SSD_L)
    _close(y, y_ref)
    _close(final, final_ref)
    # the state after the padded tail equals the state after the valid prefix (run it alone, zero-padded to 32)
    T2 = 2 * SSD_L
    _, final_prefix = REF.ssd_scan(x[1:, :T2], dt[1:, :T2], A, B[1:, :T2], C[1:, :T2], init[1:],
                                         chunk_size=SSD_L)
    _close(final[1:], final_prefix)
    # and the padded run's chunk state at the end of chunk 2 (all of chunk 3 is padding) is exactly the final
    _, final_k, states_k = ssd.ssd_scan(x, dt, A, B, C, init, chunk_size=SSD_L, return_chunk_states=True,
                                        interpret=True)
    np.testing.assert_array_equal(np.asarray(states_k[1, 1]), np.asarray(final_k[1]))


def test_ssd_chunk_states_equal_scan_on_prefixes():
    x, dt, A, B, C, init = _ssd_inputs(2, **SSD_SHAPE)
    _, final, states = ssd.ssd_scan(x, dt, A, B, C, init, chunk_size=SSD_L, return_chunk_states=True,
                                    interpret=True)
    n_chunks = SSD_SHAPE["T"] // SSD_L
    assert states.shape == (2, n_chunks, 4, 12, 16)
    for c in range(1, n_chunks + 1):
        t = c * SSD_L
        _, prefix_final = REF.ssd_scan(x[:, :t], dt[:, :t], A, B[:, :t], C[:, :t], init, chunk_size=SSD_L)
        _close(states[:, c - 1], prefix_final)
    np.testing.assert_array_equal(np.asarray(states[:, -1]), np.asarray(final))
    # the kernel itself on the 1-chunk prefix (T = chunk_size) agrees with its own first chunk state
    _, k_final = ssd.ssd_scan(x[:, :SSD_L], dt[:, :SSD_L], A, B[:, :SSD_L], C[:, :SSD_L], init, chunk_size=SSD_L,
                              interpret=True)
    _close(k_final, states[:, 0])


def test_ssd_scan_several_head_dim_blocks_one_group():
    # P = 32 split into two 16-wide blocks, 4 heads sharing a single group, chunk 32 over T = 64
    x, dt, A, B, C, init = _ssd_inputs(3, Bsz=1, T=64, H=4, P=32, G=1, N=16)
    want = REF.ssd_scan(x, dt, A, B, C, init, chunk_size=32, return_chunk_states=True)
    got = ssd.ssd_scan(x, dt, A, B, C, init, chunk_size=32, return_chunk_states=True, block_p=16, interpret=True)
    for g, w in zip(got, want):
        _close(g, w)


# ------------------------------------------------------------------------------------------------------ SSM update

@pytest.mark.parametrize("P,block_p,state_dtype", [(12, None, jnp.float32), (32, 16, jnp.float32),
                                                    (32, None, jnp.bfloat16)])
def test_ssm_decode_step_matches_reference(P, block_p, state_dtype):
    rng = _rng(10 + P)
    Bsz, H, G, N = 3, 4, 2, 16
    state = _f32(rng, Bsz, H, P, N).astype(state_dtype)
    x = _f32(rng, Bsz, H, P)
    dt = jnp.asarray(rng.uniform(0.0, 0.6, (Bsz, H)).astype(np.float32)).at[0, 1].set(0.0)  # dt=0: state kept
    A = -jnp.asarray(rng.uniform(0.2, 2.0, (H,)).astype(np.float32))
    B, C = _f32(rng, Bsz, G, N), _f32(rng, Bsz, G, N)
    y_ref, new_ref = REF.ssm_decode_step(state, x, dt, A, B, C)
    y, new = ssm_update.ssm_decode_step(state, x, dt, A, B, C, block_p=block_p, interpret=True)
    assert y.dtype == new.dtype == jnp.float32 and new.shape == state.shape and y.shape == x.shape
    _close(y, y_ref)
    _close(new, new_ref)
    np.testing.assert_array_equal(np.asarray(new[0, 1]), np.asarray(state[0, 1], np.float32))


# ---------------------------------------------------------------------------------------------------------- conv1d

# T = 13 is not a multiple of the token block (16 here) and C = 24 not of the 16-wide channel block; lengths cover
# 0 (state kept), 1 and 2 (< W-1: the new state mixes old state and inputs), a middle value and the full span.
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv1d_ragged_lengths(with_bias):
    rng = _rng(20)
    Bsz, T, C, W = 5, 13, 24, 4
    x, state, w = _f32(rng, Bsz, T, C), _f32(rng, Bsz, C, W - 1), _f32(rng, C, W, scale=0.5)
    b = _f32(rng, C) if with_bias else None
    lengths = jnp.array([0, 1, 2, 9, 13], jnp.int32)
    y_ref, s_ref = REF.causal_conv1d(x, state, w, b, lengths)
    y, s = conv1d.causal_conv1d(x, state, w, b, lengths, interpret=True)
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    _close(y, y_ref)
    _close(s, s_ref)


def test_causal_conv1d_exact_blocks_and_single_token():
    rng = _rng(21)
    Bsz, C, W = 2, 32, 4
    state, w, b = _f32(rng, Bsz, C, W - 1), _f32(rng, C, W, scale=0.5), _f32(rng, C)
    # T = 16 = two full token blocks of 8 over two channel blocks of 16: no padding anywhere
    x = _f32(rng, Bsz, 16, C)
    lengths = jnp.array([16, 5], jnp.int32)
    for got, want in zip(conv1d.causal_conv1d(x, state, w, b, lengths, block_t=8, block_c=16, interpret=True),
                         REF.causal_conv1d(x, state, w, b, lengths)):
        _close(got, want)
    # T = 1 (a one-token span), lengths 1 and 0
    x1 = x[:, :1]
    lengths1 = jnp.array([1, 0], jnp.int32)
    for got, want in zip(conv1d.causal_conv1d(x1, state, w, b, lengths1, block_c=16, interpret=True),
                         REF.causal_conv1d(x1, state, w, b, lengths1)):
        _close(got, want)
    # one-token prefill with length 1 == decode step
    y_step, s_step = conv1d.causal_conv1d_step(x[:, 0], state, w, b, block_c=16, interpret=True)
    y1, s1 = REF.causal_conv1d(x1, state, w, b, jnp.array([1, 1], jnp.int32))
    _close(y_step, y1[:, 0])
    _close(s_step, s1)


@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv1d_step_matches_reference(with_bias):
    rng = _rng(22)
    Bsz, C, W = 3, 24, 4
    x, state, w = _f32(rng, Bsz, C), _f32(rng, Bsz, C, W - 1), _f32(rng, C, W, scale=0.5)
    b = _f32(rng, C) if with_bias else None
    y_ref, s_ref = REF.causal_conv1d_step(x, state, w, b)
    y, s = conv1d.causal_conv1d_step(x, state, w, b, interpret=True)
    _close(y, y_ref)
    _close(s, s_ref)


# ------------------------------------------------------------------------------------------------- paged attention

PAGE = 4        # page size S
N_PAGES = 24
BLOCK_K = 8     # 2 pages per kv step


def _pages(rng, K, D):
    return _f32(rng, N_PAGES, PAGE, K, D), _f32(rng, N_PAGES, PAGE, K, D)


def _block_tables(rng, kv_lens, M):
    """Distinct random pages for the used blocks, garbage (-1) past them."""
    perm = rng.permutation(N_PAGES)
    rows, used = [], 0
    for n in kv_lens:
        need = -(-int(n) // PAGE)
        rows.append(list(perm[used:used + need]) + [-1] * (M - need))
        used += need
    return jnp.asarray(np.array(rows, np.int32))


def test_paged_prefill_attention_ragged_gqa():
    rng = _rng(30)
    K, G, D = 2, 3, 16            # 6 query heads over 2 kv heads
    H, T = K * G, 7               # 7 tokens x 3 heads = 21 packed rows: two 16-row blocks, the second padded
    kv_lens = [7, 16, 17, 3, 9]   # fresh prefill; kv_len = 2 * block_k exactly; one past it; short; 1 past block
    spans = [7, 5, 7, 2, 1]       # valid query tokens per row (the rest is padding with q_pos = -1)
    q_pos = np.full((len(kv_lens), T), -1, np.int32)
    for b, (n, s) in enumerate(zip(kv_lens, spans)):
        q_pos[b, :s] = np.arange(n - s, n)
    q_pos = jnp.asarray(q_pos)
    kv_len = jnp.asarray(np.array(kv_lens, np.int32))
    k_pages, v_pages = _pages(rng, K, D)
    bt = _block_tables(rng, kv_lens, M=6)
    q = _f32(rng, len(kv_lens), T, H, D)
    want = REF.paged_prefill_attention(q, k_pages, v_pages, bt, q_pos, kv_len, scale=0.25)
    got = pa.paged_prefill_attention(q, k_pages, v_pages, bt, q_pos, kv_len, scale=0.25, block_q=16,
                                     block_k=BLOCK_K, interpret=True)
    assert got.shape == want.shape and got.dtype == q.dtype
    _close(got, want)
    assert float(jnp.max(jnp.abs(got[3, 2:]))) == 0.0  # padding rows are zero


@pytest.mark.parametrize("K,G,block_k", [(2, 3, BLOCK_K), (1, 4, 64)])  # 64: one kv step covers every row
def test_paged_decode_attention_block_boundaries(K, G, block_k):
    rng = _rng(31 + G)
    D = 16
    # 0 (nothing visible -> zeros), 1, exactly one kv block, one past it, exactly two blocks, mid-page
    kv_lens = [0, 1, 8, 9, 16, 6]
    kv_len = jnp.asarray(np.array(kv_lens, np.int32))
    k_pages, v_pages = _pages(rng, K, D)
    bt = _block_tables(rng, kv_lens, M=5)
    q = _f32(rng, len(kv_lens), K * G, D)
    want = REF.paged_decode_attention(q, k_pages, v_pages, bt, kv_len, scale=0.3)
    got = pa.paged_decode_attention(q, k_pages, v_pages, bt, kv_len, scale=0.3, block_k=block_k, interpret=True)
    _close(got, want)
    assert float(jnp.max(jnp.abs(got[0]))) == 0.0


def test_paged_decode_attention_one_page_per_step_and_traced_scale():
    rng = _rng(33)
    K, G, D = 2, 3, 16
    kv_lens = [0, 1, 8, 9, 16, 6]
    kv_len = jnp.asarray(np.array(kv_lens, np.int32))
    k_pages, v_pages = _pages(rng, K, D)
    bt = _block_tables(rng, kv_lens, M=5)
    q = _f32(rng, len(kv_lens), K * G, D)
    want = REF.paged_decode_attention(q, k_pages, v_pages, bt, kv_len, scale=0.3)
    got = pa.paged_decode_attention(q, k_pages, v_pages, bt, kv_len, scale=0.3, block_k=PAGE, interpret=True)
    _close(got, want)
    # a traced scale is folded into q (the kernel takes a static one)
    f = jax.jit(lambda s: pa.paged_decode_attention(q, k_pages, v_pages, bt, kv_len, scale=s, block_k=BLOCK_K,
                                                    interpret=True))
    _close(f(jnp.float32(0.3)), want)


# -------------------------------------------------------------------------------------------------------- dispatch

def test_dispatch_modes(monkeypatch):
    monkeypatch.setenv("HYBRID_KERNELS", "auto")
    assert ops.MEASURED_FASTER_ON_GPU == frozenset()
    if jax.default_backend() == "cpu":
        assert not any(ops.uses_pallas(op) for op in ops.OP_NAMES)
        assert set(ops.kernel_choice().values()) == {"reference"}
    monkeypatch.setenv("HYBRID_KERNELS", "reference")
    assert not any(ops.uses_pallas(op) for op in ops.OP_NAMES)
    monkeypatch.setenv("HYBRID_KERNELS", "pallas")
    assert all(ops.uses_pallas(op) for op in ops.OP_NAMES)
    monkeypatch.setenv("HYBRID_KERNELS", "bogus")
    with pytest.raises(ValueError):
        ops.mode()


def test_ops_pallas_mode_runs_kernels_end_to_end(monkeypatch):
    """HYBRID_KERNELS=pallas on CPU: every public op runs its kernel (interpret mode) and matches the reference.

    Same shapes and block sizes as the tests above, so the kernels come from the jit cache."""
    rng = _rng(40)
    x, dt, A, B, C, init = _ssd_inputs(0, **SSD_SHAPE)
    Bsz, H, P, G, N = 3, 4, 12, 2, 16
    st, xs, dts = _f32(rng, Bsz, H, P, N), _f32(rng, Bsz, H, P), jnp.abs(_f32(rng, Bsz, H))
    Bs, Cs = _f32(rng, Bsz, G, N), _f32(rng, Bsz, G, N)
    xc, sc, w, bc = _f32(rng, 5, 13, 24), _f32(rng, 5, 24, 3), _f32(rng, 24, 4), _f32(rng, 24)
    lengths = jnp.array([0, 1, 2, 9, 13], jnp.int32)
    kv_lens = [0, 1, 8, 9, 16, 6]
    kv_len = jnp.asarray(np.array(kv_lens, np.int32))
    k_pages, v_pages = _pages(rng, 1, 16)
    bt = _block_tables(rng, kv_lens, M=5)
    qd = _f32(rng, len(kv_lens), 4, 16)
    q_pos = jnp.stack([kv_len - 2, kv_len - 1], axis=1)  # two-token spans (the first is padding-like when < 0)
    qp = _f32(rng, len(kv_lens), 2, 4, 16)
    calls = {
        "ssd_scan": lambda m: m.ssd_scan(x, dt, A, B, C, init, chunk_size=SSD_L, return_chunk_states=True),
        "ssm_decode_step": lambda m: m.ssm_decode_step(st, xs, dts, A, Bs, Cs),
        "causal_conv1d": lambda m: m.causal_conv1d(xc, sc, w, bc, lengths),
        "causal_conv1d_step": lambda m: m.causal_conv1d_step(xc[:3, 0], sc[:3], w, bc),
        "paged_prefill_attention": lambda m: m.paged_prefill_attention(qp, k_pages, v_pages, bt, q_pos, kv_len,
                                                                       scale=0.3),
        "paged_decode_attention": lambda m: m.paged_decode_attention(qd, k_pages, v_pages, bt, kv_len, scale=0.3),
    }
    assert set(calls) == set(ops.OP_NAMES)
    monkeypatch.setenv("HYBRID_KERNELS", "pallas")
    if jax.default_backend() == "cpu":
        assert set(ops.kernel_choice().values()) == {"pallas-interpret"}
    for op, call in calls.items():
        got, want = call(ops), call(REF)
        for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            _close(g, w_)


# --------------------------------------------------------------------------------------- Triton lowering (no GPU)

def _lower_for_cuda(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.fixture(scope="module")
def triton_lowering_available():
    try:
        _lower_for_cuda(lambda v: conv1d.causal_conv1d_step(v, jnp.zeros((1, 16, 3)), jnp.zeros((16, 4)), None),
                        jax.ShapeDtypeStruct((1, 16), jnp.float32))
    except Exception as e:  # pragma: no cover - jaxlib without the Triton dialect
        pytest.skip(f"cannot lower Pallas to Triton here: {type(e).__name__}: {e}")


def test_kernels_lower_to_triton_at_real_shapes(triton_lowering_available):
    """Lowering (not compiling) every kernel for CUDA at NVIDIA-Nemotron-Nano-9B-v2 shapes, on the CPU: catches
    Triton-lowering errors (non power-of-2 arrays, unsupported primitives) without a GPU."""
    S = jax.ShapeDtypeStruct
    f32, bf16, i32 = jnp.float32, jnp.bfloat16, jnp.int32
    H, P, G, N, L, Cc = 128, 80, 8, 128, 128, 128 * 80 + 2 * 8 * 128
    Hq, K, D, page, n_pages = 40, 8, 128, 16, 512
    cases = [
        (functools.partial(ssd.ssd_scan, chunk_size=L, return_chunk_states=True),
         (S((1, 256, H, P), bf16), S((1, 256, H), f32), S((H,), f32), S((1, 256, G, N), bf16),
          S((1, 256, G, N), bf16), S((1, H, P, N), f32))),
        (ssm_update.ssm_decode_step,
         (S((4, H, P, N), f32), S((4, H, P), bf16), S((4, H), f32), S((H,), f32), S((4, G, N), bf16),
          S((4, G, N), bf16))),
        (conv1d.causal_conv1d, (S((2, 200, Cc), bf16), S((2, Cc, 3), bf16), S((Cc, 4), bf16), S((Cc,), bf16),
                                S((2,), i32))),
        (conv1d.causal_conv1d_step, (S((4, Cc), bf16), S((4, Cc, 3), bf16), S((Cc, 4), bf16), S((Cc,), bf16))),
        (functools.partial(pa.paged_prefill_attention, scale=D ** -0.5),
         (S((2, 128, Hq, D), bf16), S((n_pages, page, K, D), bf16), S((n_pages, page, K, D), bf16),
          S((2, 32), i32), S((2, 128), i32), S((2,), i32))),
        (functools.partial(pa.paged_decode_attention, scale=D ** -0.5),
         (S((4, Hq, D), bf16), S((n_pages, page, K, D), bf16), S((n_pages, page, K, D), bf16), S((4, 32), i32),
          S((4,), i32))),
    ]
    for fn, args in cases:
        text = _lower_for_cuda(fn, *args).as_text()
        assert "__gpu$xla.gpu.triton" in text  # the Triton backend, not Mosaic GPU


def test_model_steps_with_pallas_kernels_match_the_forward(monkeypatch, tmp_path):
    """The cached model steps run every kernel (interpret mode on CPU) inside the layer scan, with the pools'
    flat page layout, and match the uncached forward (a config of its own: nothing traced before is reused)."""
    import hybrid_jax
    from conftest import write_tiny_byte_model
    from hybrid_jax.generate import SingleSequence

    cfg, params = hybrid_jax.load_pretrained(write_tiny_byte_model(str(tmp_path), seed=3,
                                                                   layers=("attention", "mamba", "mlp", "mamba")))
    toks = np.random.RandomState(0).randint(0, 256, 40).tolist()
    monkeypatch.setenv("HYBRID_KERNELS", "pallas")
    seq = SingleSequence(params, cfg, 64)
    got = np.concatenate([np.asarray(seq.extend(toks[:25], all_logits=True)),
                          np.asarray(seq.extend(toks[25:], all_logits=True))])
    monkeypatch.setenv("HYBRID_KERNELS", "reference")
    ref = np.asarray(hybrid_jax.forward(params, cfg, np.array([toks])))[0]
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-4
