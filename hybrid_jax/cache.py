"""Device cache state: paged KV for attention layers and Mamba conv/SSM state slots.

Block 0 and slot 0 are scratch: padding rows of a bucketed batch read and write there, so no real block or slot
is touched by padding. The allocator never hands them out.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from hybrid_jax.config import ModelConfig
from hybrid_jax.mesh import AXIS, named

NULL_BLOCK = 0
NULL_SLOT = 0


@struct.dataclass
class PagedKV:
    k: jax.Array  # [attn_layers, num_blocks, block_size, kv_heads, head_dim]
    v: jax.Array


@struct.dataclass
class MambaState:
    conv: jax.Array  # [mamba_layers, num_slots, conv_dim, d_conv - 1]
    ssm: jax.Array   # [mamba_layers, num_slots, heads, head_dim, d_state], float32


@struct.dataclass
class Cache:
    kv: PagedKV
    mamba: MambaState

    @property
    def block_size(self) -> int:
        return self.kv.k.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.kv.k.shape[1]

    @property
    def num_slots(self) -> int:
        return self.mamba.ssm.shape[1]


def init_cache(cfg: ModelConfig, *, num_blocks: int, block_size: int, num_slots: int, dtype=jnp.float32) -> Cache:
    """Zeroed cache. num_blocks and num_slots include the scratch block 0 and slot 0. With cfg.tp > 1 every pool
    is created sharded over the tensor parallel mesh (`cache_specs`), never whole on one device. The bytes of a
    block and of a slot are hybrid_jax/memory.py `block_bytes` / `slot_bytes` (their one home)."""
    la, lm = max(cfg.num_attention_layers, 1), max(cfg.num_mamba_layers, 1)
    kv_shape = (la, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    shapes = Cache(kv=PagedKV(k=(kv_shape, dtype), v=(kv_shape, dtype)),
                   mamba=MambaState(conv=((lm, num_slots, cfg.conv_dim, cfg.d_conv - 1), dtype),
                                    ssm=((lm, num_slots, cfg.mamba_heads, cfg.mamba_head_dim, cfg.d_state),
                                         jnp.float32)))
    is_shape = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)
    if cfg.tp == 1:
        return jax.tree.map(lambda sd: jnp.zeros(*sd), shapes, is_leaf=is_shape)
    return jax.tree.map(lambda sd, sh: jnp.zeros(*sd, device=sh), shapes, named(cache_specs(cfg), cfg.tp),
                        is_leaf=is_shape)


def cache_specs(cfg: ModelConfig) -> Cache:
    """PartitionSpecs of the Cache pytree: KV pools by KV head, conv state by channel, SSM state by head."""
    kv = P(None, None, None, AXIS)          # [layers, blocks, block_size, kv heads, head_dim]
    return Cache(kv=PagedKV(k=kv, v=kv), mamba=MambaState(conv=P(None, None, AXIS),   # [layers, slots, C, W-1]
                                                          ssm=P(None, None, AXIS)))   # [layers, slots, H, P, N]


def constrain_cache(cache: Cache, cfg: ModelConfig) -> Cache:
    """Inside a jitted step: pin the cache to its sharding (no-op at tp 1), so that a step returns the cache
    exactly as it took it (donation aliases, nothing recompiles)."""
    if cfg.tp == 1:
        return cache
    return jax.lax.with_sharding_constraint(cache, named(cache_specs(cfg), cfg.tp))


def copy_block(cache: Cache, src: jax.Array, dst: jax.Array) -> Cache:
    """Copy-on-write of KV blocks src[i] -> dst[i] in every attention layer (vectors of block ids)."""
    kv = cache.kv
    return cache.replace(kv=PagedKV(k=kv.k.at[:, dst].set(kv.k[:, src]), v=kv.v.at[:, dst].set(kv.v[:, src])))


def copy_slot(cache: Cache, src: jax.Array, dst: jax.Array) -> Cache:
    """Copy Mamba conv + SSM state of slots src[i] -> dst[i] in every Mamba layer."""
    m = cache.mamba
    return cache.replace(mamba=MambaState(conv=m.conv.at[:, dst].set(m.conv[:, src]),
                                          ssm=m.ssm.at[:, dst].set(m.ssm[:, src])))
