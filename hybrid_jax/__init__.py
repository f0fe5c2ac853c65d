"""Pure-functional core for hybrid Transformer + Mamba2 models: config, loading, model steps, cache operations."""
from hybrid_jax.cache import Cache, MambaState, PagedKV, init_cache
from hybrid_jax.config import ConfigError, ModelConfig, from_hf
from hybrid_jax.generate import generate_greedy
from hybrid_jax.loader import CheckpointError, load_pretrained
from hybrid_jax.model import SpanBatch, forward, make_steps

__all__ = ["Cache", "CheckpointError", "ConfigError", "MambaState", "ModelConfig", "PagedKV", "SpanBatch",
           "forward", "from_hf", "generate_greedy", "init_cache", "load_pretrained", "make_steps"]
