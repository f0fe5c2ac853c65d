"""Grouped matmul over rows sorted by group: the expert compute of a mixture-of-experts layer.

`grouped_matmul(x_MK, w_GKN, sizes_G)` has exactly the semantics of `jax.lax.ragged_dot(x_MK, w_GKN, sizes_G)`:
rows are sorted by group, rows [start_g, start_g + sizes_G[g]) are multiplied by w_GKN[g] (start_g: the sum of the
sizes before g), rows past sum(sizes_G) give 0. Two implementations:

* "ragged_dot": `jax.lax.ragged_dot`. On GPU and TPU XLA runs it as one grouped GEMM. On CPU (jax 0.10.2) it is
  lowered as a dense product over *every* group (the rows are expanded to [G, M, K] and masked), so its cost grows
  with the number of groups whatever the rows: measured 21 ms at 8 groups and 640 ms at 128 groups for 6 rows
  (K 1024, N 512) - the dense product over all experts a MoE layer must not pay.
* "tiled": rows in tiles of `tile_rows` that never straddle two groups (a group's rows start a new tile); a
  `lax.while_loop` over the tiles that exist multiplies each by its group's weight (`x_tile @ w[g]`). The work and
  the weight reads follow the rows: at most M / tile_rows + min(G, M) tiles, each reading one [K, N] weight, so
  6 rows read at most 6 expert matrices whether there are 8 experts or 128. The default on CPU.

`impl=None` picks "tiled" on CPU and "ragged_dot" elsewhere. All dots accumulate in float32; the result has x's
dtype (like ragged_dot's default).

`layer`: with a stacked weight w_LGKN, the groups of layer `layer` (a traced index). The tiled loop then reads
w[layer, g] for each tile itself: slicing the layer first (w[layer], all G experts) would copy every expert's
weights, a cost that grows with the number of experts.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.ops import platform

IMPLS = ("tiled", "ragged_dot")


def default_impl() -> str:
    """"tiled" on CPU, "ragged_dot" elsewhere (the platform of `ops.lowering_for` when one is named)."""
    return "tiled" if platform() == "cpu" else "ragged_dot"


def default_tile_rows(num_rows: int, num_groups: int) -> int:
    """A power of 2 near the mean rows per group, in [8, 128]: few padded rows when groups are small (decode),
    few tiles (weight reads) when they are large (prefill)."""
    mean = max(1, num_rows // max(num_groups, 1))
    t = 8
    while t * 2 <= min(mean, 128):
        t *= 2
    return t


def max_tiles(num_rows: int, num_groups: int, tile_rows: int) -> int:
    """Upper bound of sum_g ceil(s_g / tile_rows) over sizes s_g >= 0 summing to num_rows: each of at most
    min(G, M) non-empty groups wastes at most tile_rows - 1 rows of its last tile."""
    return (num_rows + min(num_groups, num_rows) * (tile_rows - 1)) // tile_rows


def _tile_table(sizes_G, tile_rows: int, n_tiles: int):
    """Per tile t < n_tiles: (group, first row, valid rows) and the number of tiles that exist."""
    sizes = sizes_G.astype(jnp.int32)
    tiles_G = (sizes + tile_rows - 1) // tile_rows
    tile_end_G = jnp.cumsum(tiles_G)
    row_start_G = jnp.cumsum(sizes) - sizes
    t = jnp.arange(n_tiles, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(tile_end_G, t, side="right"), sizes.shape[0] - 1).astype(jnp.int32)
    local = t - (tile_end_G[g] - tiles_G[g])
    first = row_start_G[g] + local * tile_rows
    valid = jnp.clip(sizes[g] - local * tile_rows, 0, tile_rows)
    return g, first, valid, tile_end_G[-1]


def grouped_matmul_tiled(x_MK, w_GKN, sizes_G, *, tile_rows: int | None = None, layer=None):
    """The "tiled" implementation (see the module docstring)."""
    M, K = x_MK.shape
    G, K2, N = w_GKN.shape[-3:]
    assert K == K2, (x_MK.shape, w_GKN.shape)
    if M == 0:
        return jnp.zeros((0, N), x_MK.dtype)
    tm = tile_rows or default_tile_rows(M, G)
    n_tiles = max_tiles(M, G, tm)
    g_T, first_T, valid_T, count = _tile_table(sizes_G, tm, n_tiles)
    x_pad = jnp.concatenate([x_MK, jnp.zeros((tm, K), x_MK.dtype)])  # a last tile may read past row M
    rows = jnp.arange(tm)

    def body(carry):
        t, out = carry
        g, first, valid = g_T[t], first_T[t], valid_T[t]
        xt = lax.dynamic_slice_in_dim(x_pad, first, tm)
        wt = w_GKN[g] if layer is None else w_GKN[layer, g]  # one expert's [K, N], read where it lies
        yt = jnp.dot(xt, wt, preferred_element_type=jnp.float32)
        yt = jnp.where((rows < valid)[:, None], yt, 0.0)  # rows of the next group: added as 0
        cur = lax.dynamic_slice_in_dim(out, first, tm)
        return t + 1, lax.dynamic_update_slice_in_dim(out, cur + yt, first, 0)

    out = jnp.zeros((M + tm, N), jnp.float32)
    _, out = lax.while_loop(lambda c: c[0] < count, body, (jnp.int32(0), out))
    return out[:M].astype(x_MK.dtype)


def grouped_matmul(x_MK, w_GKN, sizes_G, *, layer=None, impl: str | None = None, tile_rows: int | None = None):
    """x_MK rows sorted by group times their group's w_GKN[g] (w_GKN[layer, g] for a stacked [L, G, K, N]
    weight) -> [M, N] (see the module docstring)."""
    impl = impl or default_impl()
    if impl == "tiled":
        return grouped_matmul_tiled(x_MK, w_GKN, sizes_G, tile_rows=tile_rows, layer=layer)
    if impl == "ragged_dot":
        w_GKN = w_GKN if layer is None else w_GKN[layer]
        return lax.ragged_dot(x_MK, w_GKN, sizes_G.astype(jnp.int32),
                              preferred_element_type=jnp.float32).astype(x_MK.dtype)
    raise ValueError(f"grouped_matmul impl {impl!r}: expected one of {IMPLS}")
