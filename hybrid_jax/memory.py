"""One memory budget for the cache: how many KV blocks and Mamba state slots to allocate, computed without
allocating anything.

The cache (hybrid_jax/cache.py `init_cache`) holds two pools:

* KV blocks: per attention layer, `block_size` tokens of k and v in the cache dtype;
* Mamba state slots: per Mamba layer, the conv state (cache dtype) and the SSM state (always float32). A slot
  holds the state of one conversation at one point, so the number of slots bounds the running plus the cached
  conversations. For NVIDIA-Nemotron-Nano-9B-v2 a slot is ~143 MB against ~0.26 MB for a 16-token bf16 block:
  slots, not blocks, are what a budget runs out of.

`plan_cache` splits one budget between the two from the model's real per-block and per-slot sizes (see its
docstring for the rule). Block 0 and slot 0 are scratch: every count here includes them, exactly as `init_cache`
takes them.
"""
from __future__ import annotations

import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.config import ModelConfig

log = logging.getLogger(__name__)

#: Cached (committed, not running) conversations the default slot count leaves room for, per max_num_seqs.
CACHED_CONVERSATIONS_PER_SEQ = 4

BUDGET_FLAGS = "--kv-memory / --gpu-memory-utilization"


class CachePlanError(ValueError):
    """The cache cannot be planned as asked; the message names the flag to change."""


# ----------------------------------------------------------------------------- sizes and units

def parse_bytes(v) -> int | None:
    """A memory size: None, an int (bytes), or a string such as "512MiB", "2GiB", "40GiB", "1.5GB", "1000000".

    K/M/G/T are powers of 1024 whether written KB, KiB or K."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError(f"cannot parse memory size {v!r} (e.g. 512MiB, 2GiB, 1000000)")
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float):
        return int(v)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", str(v), re.I)
    if not m:
        raise ValueError(f"cannot parse memory size {v!r} (e.g. 512MiB, 2GiB, 1000000)")
    try:
        x = float(m.group(1))
    except ValueError:
        raise ValueError(f"cannot parse memory size {v!r} (e.g. 512MiB, 2GiB, 1000000)") from None
    return int(x * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))


def format_bytes(n: int | float) -> str:
    """Human units, powers of 1024: "512 B", "1.5 KiB", "12.3 GiB"."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _itemsize(dtype) -> int:
    return jnp.dtype(dtype).itemsize


def block_bytes(cfg: ModelConfig, block_size: int, dtype) -> int:
    """Bytes of one KV block across the layers on each device, exactly as `init_cache` allocates it (one layer's
    worth even for a model without attention layers: init_cache keeps a one-layer pool there). With tensor
    parallelism (cfg.tp > 1) each device holds 1/tp of it (its KV heads)."""
    la = max(cfg.num_attention_layers, 1)
    return 2 * la * block_size * cfg.num_kv_heads * cfg.head_dim * _itemsize(dtype) // cfg.tp


def slot_bytes(cfg: ModelConfig, dtype) -> int:
    """Bytes of one Mamba state slot across the layers on each device, exactly as `init_cache` allocates it: conv
    state in the cache dtype, SSM state float32; 1/tp of it per device with tensor parallelism (its heads)."""
    lm = max(cfg.num_mamba_layers, 1)
    return lm * (cfg.conv_dim * (cfg.d_conv - 1) * _itemsize(dtype)
                 + cfg.mamba_heads * cfg.mamba_head_dim * cfg.d_state * 4) // cfg.tp


def device_memory_bytes(device=None) -> int | None:
    """Memory of a jax device (default: the first) that JAX may allocate, from `device.memory_stats()
    ["bytes_limit"]`; None on CPU or when the backend does not report it.

    On a GPU this is the limit of XLA's allocator: by default 75% of the GPU's memory
    (`XLA_PYTHON_CLIENT_MEM_FRACTION` sets the fraction), not the whole of it."""
    try:
        if device is None:
            device = jax.devices()[0]
        if getattr(device, "platform", None) == "cpu":
            return None
        stats = device.memory_stats()
    except Exception:  # backends without memory_stats raise or return None
        return None
    if not stats or not stats.get("bytes_limit"):
        return None
    return int(stats["bytes_limit"])


def param_bytes(params) -> int:
    """Bytes of a params pytree (numpy or jax arrays) on one device: a sharded jax array counts its shard on
    the first device that holds one (the whole array when it is replicated or on one device)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(params):
        shards = getattr(leaf, "addressable_shards", None)
        if shards:
            total += int(shards[0].data.nbytes)
        elif hasattr(leaf, "nbytes"):
            total += int(leaf.nbytes)
        else:
            a = np.asarray(leaf)
            total += int(a.nbytes)
    return total


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class CachePlan:
    """How many KV blocks and Mamba state slots to allocate. Counts include the scratch block 0 and slot 0."""
    num_blocks: int
    num_slots: int
    block_size: int
    block_bytes: int
    slot_bytes: int
    budget: int | None = None   # the bytes the plan had to fit in (None: no budget, default sizing)

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def state_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def total_bytes(self) -> int:
        """Exactly what `init_cache(cfg, num_blocks=..., num_slots=..., block_size=..., dtype=...)` allocates."""
        return self.kv_bytes + self.state_bytes

    @property
    def tokens(self) -> int:
        """Tokens the usable blocks hold (the scratch block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    def describe(self) -> str:
        """One log line: blocks, the tokens they hold, slots, the bytes of each and the total."""
        budget = (f" of a {format_bytes(self.budget)} budget" if self.budget is not None
                  else " (no memory budget: sized from the lengths)")
        return (f"{self.num_blocks:,} KV blocks x {self.block_size} tokens = {self.tokens:,} tokens "
                f"({format_bytes(self.kv_bytes)}, {format_bytes(self.block_bytes)} a block); "
                f"{self.num_slots:,} Mamba state slots ({format_bytes(self.state_bytes)}, "
                f"{format_bytes(self.slot_bytes)} a slot); total {format_bytes(self.total_bytes)}{budget}")


def _budget(kv_memory, gpu_memory_utilization, device_memory, weight_bytes) -> tuple[int | None, str]:
    """(budget bytes or None, the flag it came from)."""
    kv = parse_bytes(kv_memory)
    if gpu_memory_utilization is not None:
        u = float(gpu_memory_utilization)
        if not 0.0 < u <= 1.0:
            raise CachePlanError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    if kv is not None:
        if kv <= 0:
            raise CachePlanError(f"--kv-memory must be positive, got {kv_memory!r}")
        if gpu_memory_utilization is not None:
            log.warning("both --kv-memory and --gpu-memory-utilization given: the cache gets --kv-memory=%s",
                        format_bytes(kv))
        return kv, "--kv-memory"
    if gpu_memory_utilization is None:
        return None, ""
    if device_memory is None:
        log.warning("--gpu-memory-utilization=%s ignored: the device reports no memory size (CPU?); "
                    "use --kv-memory to bound the cache", gpu_memory_utilization)
        return None, ""
    budget = int(float(gpu_memory_utilization) * int(device_memory)) - int(weight_bytes)
    if budget <= 0:
        raise CachePlanError(
            f"--gpu-memory-utilization={gpu_memory_utilization} leaves no memory for the cache: "
            f"{format_bytes(float(gpu_memory_utilization) * device_memory)} of the device's "
            f"{format_bytes(device_memory)}, and the weights take {format_bytes(weight_bytes)}; raise "
            f"--gpu-memory-utilization or give the cache its own budget with --kv-memory")
    return budget, "--gpu-memory-utilization"


def plan_cache(cfg: ModelConfig, *, dtype, block_size: int, max_model_len: int, max_num_seqs: int,
               slots_per_seq: int = 1, kv_memory=None, gpu_memory_utilization: float | None = None,
               device_memory: int | None = None, weight_bytes: int = 0, num_blocks: int | None = None,
               num_slots: int | None = None) -> CachePlan:
    """Plan the KV blocks and Mamba state slots of the cache under one memory budget. Allocates nothing.

    dtype: the cache dtype (KV blocks and conv state; the SSM state is float32 whatever it is).
    slots_per_seq: state slots a running sequence holds (2 in cache_mode="align", 1 in "exact"/"none").

    Budget (bytes for blocks and slots together):
      * `kv_memory` if given (bytes or a size string, "40GiB");
      * else `gpu_memory_utilization * device_memory - weight_bytes` when both are given (vLLM's meaning: the
        fraction of device memory the process may use, weights included);
      * else none.

    Minimum (always required): one sequence of max_model_len, ceil(max_model_len / block_size) blocks, plus the
    slots of max_num_seqs running requests, slots_per_seq * max_num_seqs slots; each plus its scratch.

    With a budget:
      * slots: `num_slots` as given, else min(the slots that fit in half the budget,
        slots_per_seq * max_num_seqs + max(max_num_seqs, CACHED_CONVERSATIONS_PER_SEQ * max_num_seqs)) + 1
        (running requests plus room for cached conversations, plus scratch), never below the minimum and never
        so many that the minimum blocks no longer fit;
      * blocks: `num_blocks` as given, else all the rest of the budget.
      The plan never exceeds the budget.
    Without a budget (default sizing): blocks for 2 * max_num_seqs full-length sequences (+ scratch), slots for
    the running requests plus as many committed conversations, slots_per_seq * max_num_seqs + max_num_seqs + 1;
    `num_blocks` / `num_slots` replace either.

    Raises CachePlanError, naming the flag to change, when the budget cannot hold the minimum, when explicit
    num_blocks / num_slots are below the minimum, or when they do not fit in the budget.
    """
    need = _Need(int(block_size), int(max_model_len), int(max_num_seqs), int(slots_per_seq), cfg, dtype)
    need.check(num_blocks, num_slots)
    budget, flag = _budget(kv_memory, gpu_memory_utilization, device_memory, weight_bytes)
    if budget is None:
        nb = int(num_blocks) if num_blocks is not None else 2 * need.max_num_seqs * need.seq_blocks + 1
        ns = (int(num_slots) if num_slots is not None
              else need.slots_per_seq * need.max_num_seqs + need.max_num_seqs + 1)
        return CachePlan(nb, ns, need.block_size, need.bb, need.sb, None)
    return _fit_budget(need, budget, flag, num_blocks, num_slots)


@dataclasses.dataclass(frozen=True)
class _Need:
    """What a plan must hold: one sequence of max_model_len and the slots of max_num_seqs running requests."""
    block_size: int
    max_model_len: int
    max_num_seqs: int
    slots_per_seq: int
    cfg: ModelConfig
    dtype: object

    @property
    def bb(self) -> int:
        return block_bytes(self.cfg, self.block_size, self.dtype)

    @property
    def sb(self) -> int:
        return slot_bytes(self.cfg, self.dtype)

    @property
    def seq_blocks(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def min_blocks(self) -> int:
        return self.seq_blocks + 1

    @property
    def min_slots(self) -> int:
        return self.slots_per_seq * self.max_num_seqs + 1

    def check(self, num_blocks, num_slots) -> None:
        """Raise CachePlanError for sizes that are not positive or explicit counts below the minimum."""
        if self.block_size <= 0:
            raise CachePlanError(f"--block-size must be positive, got {self.block_size}")
        if self.max_model_len <= 0:
            raise CachePlanError(f"--max-model-len must be positive, got {self.max_model_len}")
        if self.max_num_seqs <= 0:
            raise CachePlanError(f"--max-num-seqs must be positive, got {self.max_num_seqs}")
        if self.slots_per_seq <= 0:
            raise ValueError(f"slots_per_seq must be positive, got {self.slots_per_seq}")
        if num_blocks is not None and int(num_blocks) < self.min_blocks:
            raise CachePlanError(
                f"--num-blocks={num_blocks} cannot hold one sequence of --max-model-len={self.max_model_len}: that "
                f"takes {self.seq_blocks} blocks of {self.block_size} tokens plus the scratch block, "
                f"{self.min_blocks}; raise --num-blocks or lower --max-model-len")
        if num_slots is not None and int(num_slots) < self.min_slots:
            raise CachePlanError(
                f"--num-slots={num_slots} is too small for --max-num-seqs={self.max_num_seqs}: running requests "
                f"hold {self.slots_per_seq * self.max_num_seqs} state slots ({self.slots_per_seq} each) plus the "
                f"scratch slot, {self.min_slots}; raise --num-slots or lower --max-num-seqs")


def _fit_budget(need: _Need, budget: int, flag: str, num_blocks, num_slots) -> CachePlan:
    """The plan of `need` within budget bytes (from `flag`), see plan_cache."""
    bb, sb, min_blocks, min_slots = need.bb, need.sb, need.min_blocks, need.min_slots
    if budget < min_blocks * bb + min_slots * sb:
        raise CachePlanError(
            f"{flag}: the cache budget of {format_bytes(budget)} cannot hold one sequence of "
            f"--max-model-len={need.max_model_len} ({min_blocks} KV blocks of {format_bytes(bb)}, "
            f"{format_bytes(min_blocks * bb)}) plus the Mamba state of --max-num-seqs={need.max_num_seqs} running "
            f"requests ({min_slots} slots of {format_bytes(sb)}, {format_bytes(min_slots * sb)}): it needs at "
            f"least {format_bytes(min_blocks * bb + min_slots * sb)}. Raise {BUDGET_FLAGS}, or lower "
            f"--max-model-len or --max-num-seqs")
    ns = _fit_slots(need, budget, flag, num_blocks, num_slots)
    if num_blocks is not None:
        nb = int(num_blocks)
        if nb * bb + ns * sb > budget:
            raise CachePlanError(
                f"--num-blocks={nb} ({format_bytes(nb * bb)}) plus {ns} Mamba state slots "
                f"({format_bytes(ns * sb)}) exceed the {flag} budget of {format_bytes(budget)}; lower "
                f"--num-blocks or --num-slots, or raise {flag}")
    else:
        nb = (budget - ns * sb) // bb
    plan = CachePlan(int(nb), int(ns), need.block_size, bb, sb, int(budget))
    assert plan.total_bytes <= budget and nb >= min_blocks and ns >= min_slots, plan
    return plan


def _fit_slots(need: _Need, budget: int, flag: str, num_blocks, num_slots) -> int:
    """The slots of a budgeted plan: num_slots if it fits, else the default share (see plan_cache)."""
    bb, sb, min_slots, max_num_seqs = need.bb, need.sb, need.min_slots, need.max_num_seqs
    if num_slots is not None:
        ns = int(num_slots)
        blocks_needed = int(num_blocks) if num_blocks is not None else need.min_blocks
        if ns * sb + blocks_needed * bb > budget:
            raise CachePlanError(
                f"--num-slots={ns} ({format_bytes(ns * sb)} of Mamba state) plus {blocks_needed} KV blocks "
                f"({format_bytes(blocks_needed * bb)}) exceed the {flag} budget of {format_bytes(budget)}; lower "
                f"--num-slots" + (" or --num-blocks" if num_blocks is not None else "") + f" or raise {flag}")
        return ns
    blocks_taken = (int(num_blocks) if num_blocks is not None else need.min_blocks) * bb
    if blocks_taken + min_slots * sb > budget:  # only reachable with an explicit num_blocks
        raise CachePlanError(
            f"--num-blocks={num_blocks} ({format_bytes(blocks_taken)}) plus the {min_slots} Mamba state "
            f"slots of --max-num-seqs={max_num_seqs} running requests ({format_bytes(min_slots * sb)}) exceed "
            f"the {flag} budget of {format_bytes(budget)}; lower --num-blocks or raise {flag}")
    target = (need.slots_per_seq * max_num_seqs + max(max_num_seqs, CACHED_CONVERSATIONS_PER_SEQ * max_num_seqs)
              + 1)
    half = (budget // 2) // sb
    room = (budget - blocks_taken) // sb
    return max(min_slots, min(target, half, room))

__all__ = ["BUDGET_FLAGS", "CACHED_CONVERSATIONS_PER_SEQ", "CachePlan", "CachePlanError", "block_bytes",
           "device_memory_bytes", "format_bytes", "param_bytes", "parse_bytes", "plan_cache", "slot_bytes"]
