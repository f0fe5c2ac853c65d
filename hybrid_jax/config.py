"""Static model configuration, parsed from a Hugging Face `config.json` of one of three hybrid families.

Every family is flattened into one list of residual *sublayers* (norm -> op -> residual add), each of kind
"mamba", "attention", "mlp" or "moe". NemotronH layers are already sublayers ("E" is a mixture-of-experts layer);
a Granite or Bamba decoder layer is a mixer sublayer followed by an MLP sublayer, or, for a Granite model with
`num_local_experts` > 0, by a "moe" sublayer (routed experts plus the shared MLP over one norm).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

FAMILIES = ("nemotron_h", "granitemoehybrid", "bamba")
#: NemotronH hybrid_override_pattern characters -> sublayer kind.
PATTERN_KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
#: Layer type spellings of saved configs (layers_block_type / layer_types; transformers 5 writes linear_attention
#: and full_attention) -> sublayer kind.
LAYER_TYPE_KINDS = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention",
                    "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
_NEMOTRON_KIND = PATTERN_KINDS | LAYER_TYPE_KINDS


class ConfigError(ValueError):
    """The config names something this engine does not (yet) run."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts sublayer of a model (transformers NemotronHMoE / GraniteMoeHybridMoE).

    router "sigmoid" (NemotronH): scores = sigmoid(x @ W) in float32; experts chosen by top-k of scores +
    e_score_correction_bias among the `topk_group` best of `n_group` expert groups (a group's score: the sum of its
    two best biased scores); weights = the chosen unbiased scores, divided by their sum if `norm_topk_prob`,
    times `routed_scaling_factor`.
    router "softmax" (Granite): top-k of the logits x @ W, weights = softmax over those k logits.
    Experts are `expert_kind` MLPs ("relu2": down(relu(up x)^2); "swiglu": down(silu(gate x) * up x)) of
    `intermediate_size`, without biases; with `latent_size` > 0 they work in a latent space between
    fc1_latent_proj and fc2_latent_proj. The shared expert (NemotronH shared_experts, Granite shared_mlp) is an
    MLP of `shared_intermediate_size` (0: none) on the sublayer input, added to the routed output.
    """
    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int
    expert_kind: str                    # "relu2" | "swiglu"
    router: str                         # "sigmoid" | "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    latent_size: int = 0                # 0: no latent projection


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    sublayers: tuple[str, ...]          # "mamba" | "attention" | "mlp" | "moe", in order
    rms_eps: float
    # attention
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention_bias: bool
    attn_scale: float
    rope_dim: int                       # 0: no positional encoding
    rope_theta: float
    # mlp
    intermediate_size: int
    mlp_kind: str                       # "relu2" (up/down) | "swiglu" (gate/up/down)
    mlp_bias: bool
    # mamba
    mamba_heads: int
    mamba_head_dim: int
    mamba_groups: int
    d_state: int
    d_conv: int
    chunk_size: int
    conv_bias: bool
    mamba_proj_bias: bool
    dt_min: float                       # time_step_limit
    dt_max: float
    # scalars (Granite); 1.0 elsewhere
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    max_position_embeddings: int = 4096
    torch_dtype: str = "float32"        # the checkpoint's weight dtype (config.json torch_dtype / dtype)
    moe: MoEConfig | None = None        # the "moe" sublayers' shape; None when the model has none
    # Tensor parallel layout (hybrid_jax/sharding.py `tp_config`): 1 is the checkpoint's own layout. With tp > 1
    # the Mamba in_proj columns and conv channels are stored shard-major (each of tp blocks holds its heads' z, x,
    # B, C, dt), B/C groups are duplicated when tp does not divide them, and num_kv_heads may be the duplicated
    # count (>= tp). Params and cache must be in that layout.
    tp: int = 1

    @property
    def mamba_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def ssm_groups(self) -> int:
        """The B/C groups as stored: mamba_groups, or one per shard when tp does not divide them (each shard
        then keeps a copy of the one group its heads read)."""
        return self.mamba_groups if self.mamba_groups % self.tp == 0 else self.tp

    @property
    def conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.ssm_groups * self.d_state

    @property
    def num_attention_layers(self) -> int:
        return self.sublayers.count("attention")

    @property
    def num_mamba_layers(self) -> int:
        return self.sublayers.count("mamba")

    @property
    def expert_width(self) -> int:
        """The width the routed experts read and write: the MoE latent size, else the hidden size."""
        return (self.moe.latent_size if self.moe is not None else 0) or self.hidden_size


def _float(v: Any) -> float:
    """config.json may spell infinity as {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float(v)


def _eos(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


def _torch_dtype(hf: dict) -> str:
    """The checkpoint's weight dtype: `torch_dtype` (transformers 4) or `dtype` (transformers 5 writes this),
    without a "torch." prefix; "float32" when absent."""
    v = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return str(v).removeprefix("torch.")


def _rope(hf: dict, head_dim: int, partial: float) -> tuple[int, float]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"rope type {rope_type!r} is not supported (only default RoPE)")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    return int(head_dim * partial), theta


def _nemotron_sublayers(hf: dict) -> tuple[str, ...]:
    kinds = hf.get("layers_block_type") or hf.get("layer_types")
    if kinds is None:
        pattern = hf.get("hybrid_override_pattern")
        if pattern is None:
            raise ConfigError("nemotron_h config has neither layers_block_type nor hybrid_override_pattern")
        kinds = list(pattern)
    out = []
    for k in kinds:
        if k not in _NEMOTRON_KIND:
            raise ConfigError(f"unknown NemotronH layer type {k!r}")
        out.append(_NEMOTRON_KIND[k])
    return tuple(out)


def _positive(hf: dict, key: str, what: str) -> int:
    v = hf.get(key)
    if v is None or int(v) <= 0:
        raise ConfigError(f"{what}: config.json needs a positive {key!r}, got {v!r}")
    return int(v)


def _nemotron_moe(hf: dict) -> MoEConfig:
    """NemotronH MoE fields (transformers NemotronHConfig: num_local_experts is an alias of n_routed_experts)."""
    what = "NemotronH MoE layers"
    experts = int(hf.get("n_routed_experts") or hf.get("num_local_experts") or 0)
    if experts <= 0:
        raise ConfigError(f"{what}: config.json needs a positive 'n_routed_experts'")
    n_group, topk_group = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    top_k = _positive(hf, "num_experts_per_tok", what)
    if experts % n_group or experts // n_group < 2 or not 1 <= topk_group <= n_group:
        raise ConfigError(f"{what}: n_routed_experts={experts} must split into n_group={n_group} groups of at "
                          f"least 2 experts, with 1 <= topk_group={topk_group} <= n_group")
    if top_k > topk_group * (experts // n_group):
        raise ConfigError(f"{what}: num_experts_per_tok={top_k} exceeds the experts of topk_group={topk_group} "
                          f"groups")
    # transformers builds the shared expert from moe_shared_expert_intermediate_size whatever n_shared_experts says
    shared = int(hf.get("moe_shared_expert_intermediate_size") or 0)
    return MoEConfig(num_experts=experts, top_k=top_k, intermediate_size=_positive(hf, "moe_intermediate_size", what),
                     shared_intermediate_size=shared, expert_kind=_relu2(hf.get("mlp_hidden_act", "relu2")),
                     router="sigmoid", n_group=n_group, topk_group=topk_group,
                     norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                     routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                     latent_size=int(hf.get("moe_latent_size") or 0))


def _granite_moe(hf: dict) -> MoEConfig:
    """Granite MoE fields: experts of intermediate_size, the shared MLP of shared_intermediate_size."""
    what = "Granite MoE layers"
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{what}: hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    experts = _positive(hf, "num_local_experts", what)
    top_k = _positive(hf, "num_experts_per_tok", what)
    if top_k > experts:
        raise ConfigError(f"{what}: num_experts_per_tok={top_k} > num_local_experts={experts}")
    return MoEConfig(num_experts=experts, top_k=top_k, intermediate_size=_positive(hf, "intermediate_size", what),
                     shared_intermediate_size=int(hf.get("shared_intermediate_size") or 0), expert_kind="swiglu",
                     router="softmax")


def from_hf(hf: dict) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json; raises ConfigError for unknown or unsupported models."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"unknown architecture model_type={family!r} (architectures={hf.get('architectures')}); "
                          f"supported: {', '.join(FAMILIES)}")
    H = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    common = dict(family=family, vocab_size=int(hf["vocab_size"]), hidden_size=H,
                  tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  eos_token_ids=_eos(hf.get("eos_token_id")), bos_token_id=hf.get("bos_token_id"),
                  pad_token_id=hf.get("pad_token_id"),
                  max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                  torch_dtype=_torch_dtype(hf),
                  num_heads=heads, num_kv_heads=kv)
    if family == "nemotron_h":
        return _nemotron_config(hf, common)
    return _granite_bamba_config(hf, common)


def _nemotron_config(hf: dict, common: dict) -> ModelConfig:
    H, heads = common["hidden_size"], common["num_heads"]
    head_dim = int(hf.get("head_dim") or hf.get("attention_head_dim") or H // heads)
    limit = hf.get("time_step_limit", (0.0, float("inf")))
    n_heads = int(hf.get("mamba_num_heads"))
    common["tie_word_embeddings"] = False  # NemotronH always has its own lm_head
    sublayers = _nemotron_sublayers(hf)
    return ModelConfig(
        **common, sublayers=sublayers, moe=_nemotron_moe(hf) if "moe" in sublayers else None,
        rms_eps=float(hf.get("layer_norm_epsilon", 1e-5)), head_dim=head_dim,
        attention_bias=bool(hf.get("attention_bias", False)),
        attn_scale=1.0 / math.sqrt(head_dim), rope_dim=0, rope_theta=0.0,
        intermediate_size=int(hf["intermediate_size"]), mlp_kind=_relu2(hf.get("mlp_hidden_act", "relu2")),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        mamba_heads=n_heads, mamba_head_dim=int(hf["mamba_head_dim"]),
        mamba_groups=int(hf.get("n_groups", hf.get("mamba_n_groups", 1))),
        d_state=int(hf.get("ssm_state_size", hf.get("mamba_d_state", 128))),
        d_conv=int(hf.get("conv_kernel", hf.get("mamba_d_conv", 4))),
        chunk_size=int(hf.get("chunk_size", hf.get("mamba_chunk_size", 128))),
        conv_bias=bool(hf.get("use_conv_bias", True)), mamba_proj_bias=bool(hf.get("use_bias", False)),
        dt_min=_float(limit[0]), dt_max=_float(limit[1]))


def _granite_bamba_config(hf: dict, common: dict) -> ModelConfig:
    """Granite 4.0-H and Bamba share the Mamba2 field names."""
    family, H, heads = common["family"], common["hidden_size"], common["num_heads"]
    head_dim = int(hf.get("head_dim") or H // heads)
    moe = None
    if family == "granitemoehybrid":
        if int(hf.get("num_local_experts") or 0) > 0:
            moe = _granite_moe(hf)
        layer_types = hf["layer_types"]
        rope_dim, theta = _rope(hf, head_dim, 1.0) if hf.get("position_embedding_type") == "rope" else (0, 0.0)
        intermediate = int(hf.get("shared_intermediate_size") or hf["intermediate_size"])
        scalars = dict(embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
                       residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                       logits_scaling=float(hf.get("logits_scaling", 1.0)))
        scale = float(hf.get("attention_multiplier", 1.0))  # transformers GraniteMoeHybridConfig default
    else:
        attn = set(hf.get("attn_layer_indices") or [])
        layer_types = ["attention" if i in attn else "mamba" for i in range(int(hf["num_hidden_layers"]))]
        rope_dim, theta = _rope(hf, head_dim, 0.5)  # Bamba rotates half of each head, whatever config.json says
        intermediate = int(hf["intermediate_size"])
        scalars = {}
        scale = 1.0 / math.sqrt(head_dim)
    sub: list[str] = []
    for t in layer_types:
        kind = _NEMOTRON_KIND.get(t)
        if kind not in ("mamba", "attention"):
            raise ConfigError(f"unknown layer type {t!r}")
        sub += [kind, "mlp" if moe is None else "moe"]
    n_heads = int(hf.get("mamba_n_heads", 128))  # transformers GraniteMoeHybridConfig / BambaConfig default
    limit = hf.get("time_step_limit", (0.0, float("inf")))
    expand_inner = int(hf.get("mamba_expand", 2)) * H
    d_head = hf.get("mamba_d_head", "auto")
    mamba_head_dim = expand_inner // n_heads if d_head in (None, "auto") else int(d_head)
    return ModelConfig(
        **common, **scalars, sublayers=tuple(sub), moe=moe,
        rms_eps=float(hf.get("rms_norm_eps", 1e-6 if family == "granitemoehybrid" else 1e-5)),
        head_dim=head_dim, attention_bias=bool(hf.get("attention_bias", False)), attn_scale=scale,
        rope_dim=rope_dim, rope_theta=theta, intermediate_size=intermediate, mlp_kind="swiglu",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        mamba_heads=n_heads, mamba_head_dim=mamba_head_dim, mamba_groups=int(hf.get("mamba_n_groups", 1)),
        d_state=int(hf.get("mamba_d_state", 128)), d_conv=int(hf.get("mamba_d_conv", 4)),
        chunk_size=int(hf.get("mamba_chunk_size", 256)), conv_bias=bool(hf.get("mamba_conv_bias", True)),
        mamba_proj_bias=bool(hf.get("mamba_proj_bias", False)),
        dt_min=_float(limit[0]), dt_max=_float(limit[1]))


def _relu2(act: str) -> str:
    if act != "relu2":
        raise ConfigError(f"NemotronH mlp_hidden_act {act!r} is not supported (only relu2)")
    return "relu2"
