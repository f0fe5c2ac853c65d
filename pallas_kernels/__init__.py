"""Hot-path kernels (Pallas) beside their plain-jnp references; `ops` picks one per backend."""
from pallas_kernels import reference
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.ops import (causal_conv1d, causal_conv1d_step, paged_decode_attention, paged_prefill_attention,
                                ssd_scan, ssm_decode_step)

__all__ = ["reference", "grouped_matmul", "causal_conv1d", "causal_conv1d_step", "paged_decode_attention", "paged_prefill_attention",
           "ssd_scan", "ssm_decode_step"]
