"""``dualscale profile derive``: a starting profile for another dense model on an already profiled GPU.

The GPU stays the same, so its clock response (slowdowns, idle and busy power curves) is kept;
what changes with the model is how much work one iteration is. Each latency coefficient of the
base profile is scaled by the new model's work per GPU over the base model's, term by term:

* ``base_s`` (fixed time of a step) = streaming the weights once + per-layer overhead (kernel
  launches, all-reduces). The split uses the GPU's datasheet HBM bandwidth: the weight bytes
  per GPU / bandwidth is the streaming part (scaled by streamed bytes per GPU), the rest of the
  base's ``base_s`` is overhead (scaled by the number of layers). Without a known bandwidth the
  whole term scales with the streamed bytes (said in ``source``).
* ``per_context_token_s`` (reading the KV cache) scales with the KV bytes per token per GPU of
  the layers that attend to the whole context.
* ``per_token_s`` (linear layers) and ``per_request_s`` scale with the linear-layer FLOPs per
  token per GPU (``2 x`` the weights each token multiplies, lm_head included, embedding lookup not).
* Attention FLOPs per (query, key) pair (``4 x heads x head_dim`` per full-attention layer) set the
  profile's ``attention_pair_token_equiv`` relative to the new linear FLOPs.
* Sliding-window layers (Gemma 3: 5 in 6) read at most ``window`` cached tokens: a request's
  window read is a per-request cost (``per_request_s``, exact once a context exceeds the window,
  an upper bound below it), their attention FLOPs a per-token one.

TP degrees: every one of 1, 2, 4, 8 the model fits in (heads and KV heads split evenly, weights
plus ``min_kv_tokens`` of KV cache within the usable memory). A TP degree the base lacks (TP1:
the base model does not fit one GPU) takes the coefficients and power curves of the nearest base
TP degree, scaled the same way to its own per-GPU share (so the per-layer overhead of TP1 is TP2's,
all-reduces included: an upper bound).

Every number written carries a ``source`` naming the rule and the ratio it used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from dualscale.config import builtin_config_dir
from dualscale.errors import ConfigError
from dualscale.profile.schema import Coefficients, Latency, Model, ProfileConfig, TpPower, dump_toml

#: Bytes per weight of the dtypes a dense bf16/fp16/fp32 checkpoint declares.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
#: Keys that mark a mixture-of-experts config (per-token work is not the whole weight set).
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size",
            "num_experts_per_tok", "moe_num_experts", "n_shared_experts")
#: Keys that mark a state-space or hybrid (non-attention) layer stack.
NON_ATTENTION_KEYS = ("hybrid_override_pattern", "ssm_state_size", "mamba_num_heads", "mamba_d_state",
                      "linear_attn_config", "attn_layer_indices")
#: Datasheet HBM bandwidth of GPUs the built-in profiles cover, bytes/s, with their source.
DATASHEET_BANDWIDTH = {
    "NVIDIA H100 80GB HBM3 (SXM5)": (3_350_000_000_000, "NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3"),
}
#: TP degrees derive considers.
DERIVE_TP = (1, 2, 4, 8)
#: Default KV cache a TP degree must hold besides the weights to count as fitting, tokens.
MIN_KV_TOKENS = 4096
#: Sanity bounds: a config outside them is a typo or not a language model's geometry.
_MAX = {"num_hidden_layers": 1024, "hidden_size": 1 << 17, "num_attention_heads": 4096,
        "num_key_value_heads": 4096, "head_dim": 4096, "intermediate_size": 1 << 20, "vocab_size": 1 << 22,
        "sliding_window": 1 << 24}
_SIG = 6  # significant digits written, as the fit writes them


def models_dir() -> Path:
    """Folder of the shipped model configs (``configs/models``)."""
    return builtin_config_dir() / "models"


def config_path(name_or_path: str | Path) -> Path:
    """A config.json path, or a shipped one by Hugging Face id (``Qwen/Qwen3-8B``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = models_dir() / f"{str(name_or_path).replace('/', '--')}.json"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(q.stem.replace("--", "/") for q in models_dir().glob("*.json")))
    raise ConfigError(f"--config {str(name_or_path)!r}: no such file and no shipped model config of that id; "
                      f"shipped: {known or '(none)'}")


@dataclass(frozen=True)
class Geometry:
    """What the work of one token depends on, from a Hugging Face config.json."""

    name: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str
    sliding_window: int  # tokens; 0 = every layer attends to the whole context
    sliding_layers: int

    @property
    def bytes_per_param(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def layer_linear_params(self) -> int:
        """q, k, v, o projections and the gated MLP (gate, up, down) of one layer."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden_size * (2 * q + 2 * kv) + 3 * self.hidden_size * self.intermediate_size

    @property
    def params(self) -> int:
        """Stored weights: layers (with their two norms), embeddings (once if tied), final norm."""
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.layers * (self.layer_linear_params + 2 * self.hidden_size) + emb + self.hidden_size

    @property
    def streamed_params(self) -> int:
        """Weights a decode step reads in full: every linear layer and the lm_head (lookup rows aside)."""
        return self.layers * self.layer_linear_params + self.vocab_size * self.hidden_size

    @property
    def linear_flops_per_token(self) -> int:
        return 2 * self.streamed_params

    @property
    def global_layers(self) -> int:
        return self.layers - self.sliding_layers

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.bytes_per_param

    @property
    def attention_flops_per_pair_layer(self) -> int:
        """QK^T and PV of one (query, key) pair in one layer: 2 x 2 x heads x head_dim."""
        return 4 * self.heads * self.head_dim


def _fail(source: str, field: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"{source}: field `{field}` = {value!r}: {allowed}")


def _int(cfg: dict[str, Any], key: str, source: str, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if v is None:
        raise _fail(source, key, None, "required (a positive integer)")
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(source, key, v, "must be a positive integer")
    hi = _MAX.get(key)
    if v <= 0 or (hi is not None and v > hi):
        raise _fail(source, key, v, f"must be a positive integer{f' <= {hi}' if hi else ''}")
    return v


def parse_config(raw: object, source: str, name: str = "") -> Geometry:
    """Geometry of a dense decoder-only transformer from a config.json dict; ConfigError names the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object (a Hugging Face config.json)")
    cfg = dict(raw)
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers (Gemma 3): the language model's part
        cfg = {**{k: v for k, v in cfg.items() if k != "text_config"}, **cfg["text_config"]}
    for key in MOE_KEYS:
        if cfg.get(key) not in (None, 0, 1):
            raise _fail(source, key, cfg[key], "mixture-of-experts configs are not dense: derive covers dense "
                        "transformers only (every weight read for every token)")
    for key in NON_ATTENTION_KEYS:
        if cfg.get(key) is not None:
            raise _fail(source, key, cfg[key], "state-space/hybrid layer stacks are not dense transformers: "
                        "not supported by derive")
    if cfg.get("quantization_config") is not None:
        q = cfg["quantization_config"]
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise _fail(source, "quantization_config.quant_method", method,
                    f"quantized checkpoints are not supported: derive scales bytes by torch_dtype "
                    f"({', '.join(DTYPE_BYTES)})")
    layers = _int(cfg, "num_hidden_layers", source)
    hidden = _int(cfg, "hidden_size", source)
    heads = _int(cfg, "num_attention_heads", source)
    kv_heads = _int(cfg, "num_key_value_heads", source, default=heads)
    if hidden % heads:
        raise _fail(source, "num_attention_heads", heads, f"must divide hidden_size = {hidden}")
    if heads % kv_heads:
        raise _fail(source, "num_key_value_heads", kv_heads, f"must divide num_attention_heads = {heads}")
    head_dim = _int(cfg, "head_dim", source, default=hidden // heads)
    inter = _int(cfg, "intermediate_size", source)
    vocab = _int(cfg, "vocab_size", source)
    # absent: the model class's default (Gemma ties its embeddings, Llama/Qwen/Mistral do not)
    tie = cfg.get("tie_word_embeddings", str(cfg.get("model_type", "")).startswith("gemma"))
    if not isinstance(tie, bool):
        raise _fail(source, "tie_word_embeddings", tie, "must be true or false")
    dtype_key = "torch_dtype" if "torch_dtype" in cfg else "dtype"
    dtype = cfg.get(dtype_key)
    if dtype not in DTYPE_BYTES:
        raise _fail(source, dtype_key, dtype, f"must be one of {', '.join(DTYPE_BYTES)}")
    window, sliding = _sliding(cfg, layers, source)
    return Geometry(name=name or str(cfg.get("_name_or_path") or Path(source).stem.replace("--", "/")),
                    layers=layers, hidden_size=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                    intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tie, dtype=dtype,
                    sliding_window=window, sliding_layers=sliding)


def _sliding(cfg: dict[str, Any], layers: int, source: str) -> tuple[int, int]:
    """(window tokens, sliding layers): ``layer_types``, else Gemma's ``sliding_window_pattern``, else
    every layer if a window is set and not switched off (``use_sliding_window: false``, Qwen)."""
    if cfg.get("sliding_window") is None or cfg.get("use_sliding_window") is False:
        return 0, 0
    window = _int(cfg, "sliding_window", source)
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers:
            raise _fail(source, "layer_types", types, f"must list one type per layer ({layers})")
        return window, sum(t == "sliding_attention" for t in types)
    if "sliding_window_pattern" in cfg:
        p = _int(cfg, "sliding_window_pattern", source)
        return window, layers - layers // p  # layer i is global when (i + 1) % p == 0
    return window, layers


def read_config(name_or_path: str | Path, name: str = "") -> Geometry:
    """Read a config.json (path, or a shipped model id) into a :class:`Geometry`."""
    p = config_path(name_or_path)
    try:
        raw = json.loads(p.read_bytes())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from e
    return parse_config(raw, str(p), name)


def base_geometry(base: ProfileConfig, config: str | Path | None = None) -> Geometry:
    """The base profile's model geometry: ``config``, else the shipped config named like its model.

    The profile stores only part of the geometry (no heads, MLP width or vocabulary), so derive
    reads the rest from the config, after checking the two agree.
    """
    m = base.model
    g = read_config(config if config is not None else m.name, name=m.name)
    pairs = {"layers": (g.layers, m.layers), "hidden_size": (g.hidden_size, m.hidden_size),
             "kv_heads": (g.kv_heads, m.kv_heads), "head_dim": (g.head_dim, m.head_dim),
             "bytes_per_param": (g.bytes_per_param, m.bytes_per_param)}
    for field, (got, want) in pairs.items():
        if got != want:
            raise ConfigError(f"base config for {m.name!r}: {field} = {got} but the profile's model.{field} = {want}: "
                              "pass the base model's own config with --base-config")
    if abs(g.params / m.params - 1) > 0.005:
        raise ConfigError(f"base config for {m.name!r}: {g.params:,} parameters from the geometry vs the profile's "
                          f"model.params = {m.params:,} (more than 0.5 % apart): pass its config with --base-config")
    if g.sliding_layers:
        raise ConfigError(f"base model {m.name!r} has sliding-window layers: derive needs a full-attention base")
    return g


def _round(x: float) -> float:
    return float(f"{x:.{_SIG}g}")


@dataclass(frozen=True)
class TpFit:
    tp: int
    fits: bool
    reason: str


def tp_fits(g: Geometry, base: ProfileConfig, min_kv_tokens: int) -> list[TpFit]:
    """Which of 1, 2, 4, 8 GPUs the model can be split over and still hold ``min_kv_tokens`` of KV."""
    out = []
    usable = base.gpu.usable_memory_bytes
    weight_bytes = g.params * g.bytes_per_param
    kv_token = g.layers * g.kv_bytes_per_token_layer
    for tp in DERIVE_TP:
        if g.heads % tp or g.kv_heads % tp:
            out.append(TpFit(tp, False, f"{g.heads} heads / {g.kv_heads} KV heads do not split over {tp} GPUs"))
            continue
        kv_tokens = (tp * usable - weight_bytes) // kv_token
        if kv_tokens < min_kv_tokens:
            out.append(TpFit(tp, False, f"{weight_bytes / tp / 1e9:.1f} GB of weights per GPU leave "
                                        f"{max(kv_tokens, 0):,} KV tokens (< {min_kv_tokens:,}) in "
                                        f"{usable / 1e9:.1f} GB usable"))
            continue
        out.append(TpFit(tp, True, f"{weight_bytes / tp / 1e9:.1f} GB weights per GPU, {kv_tokens:,} KV tokens"))
    return out


def _nearest(tp: int, have: list[int]) -> int:
    return min(have, key=lambda t: (abs(math.log2(t / tp)), t))


def derive(base: ProfileConfig, base_geom: Geometry, new: Geometry, *, name: str,
           min_kv_tokens: int = MIN_KV_TOKENS) -> ProfileConfig:
    """The profile of ``new`` on ``base``'s GPU (see the module docstring for the rules)."""
    if new.bytes_per_param != base_geom.bytes_per_param:
        raise ConfigError(f"{new.name}: torch_dtype {new.dtype!r} has {new.bytes_per_param} bytes per weight, the base "
                          f"{base_geom.dtype!r} {base_geom.bytes_per_param}: derive keeps the base's kernels, so "
                          "the dtypes must match")
    fits = tp_fits(new, base, min_kv_tokens)
    tps = [f.tp for f in fits if f.fits]
    if not tps:
        raise ConfigError(f"{new.name}: fits in none of TP {DERIVE_TP} on {base.gpu.name}: "
                          + "; ".join(f"TP{f.tp}: {f.reason}" for f in fits))
    bw, bw_source = _bandwidth(base)
    have = sorted(c.tp for c in base.latency.prefill)
    b, n = base_geom, new
    # work per token (or per step) of the new model over the base's, whole model; per GPU below
    r_lin = n.linear_flops_per_token / b.linear_flops_per_token
    r_stream = n.streamed_params * n.bytes_per_param / (b.streamed_params * b.bytes_per_param)
    r_kv = (n.global_layers * n.kv_bytes_per_token_layer) / (b.global_layers * b.kv_bytes_per_token_layer)
    r_layers = n.layers / b.layers
    # sliding layers: per request, a window of KV per layer (memory); per token, window pairs (FLOPs)
    window_kv_bytes = n.sliding_layers * n.sliding_window * n.kv_bytes_per_token_layer
    base_kv_bytes = b.global_layers * b.kv_bytes_per_token_layer
    window_flops = n.sliding_layers * n.sliding_window * n.attention_flops_per_pair_layer
    attn_equiv = (base.model.attention_token_equiv
                  * (n.global_layers * n.attention_flops_per_pair_layer / n.linear_flops_per_token)
                  / (b.global_layers * b.attention_flops_per_pair_layer / b.linear_flops_per_token))
    entries: dict[str, list[Coefficients]] = {"prefill": [], "decode": []}
    for tp in tps:
        src = _nearest(tp, have)
        share = src / tp  # the new model's per-GPU share vs the base's at src
        for phase in ("prefill", "decode"):
            c = next(x for x in getattr(base.latency, phase) if x.tp == src)
            stream_b = c.base_s if bw is None else min(c.base_s, b.streamed_params * b.bytes_per_param / src / bw)
            over_b = c.base_s - stream_b
            base_s = stream_b * r_stream * share + over_b * r_layers
            window_s = c.per_context_token_s * window_kv_bytes / base_kv_bytes * share
            per_token = c.per_token_s * r_lin * share * (1.0 + window_flops / n.linear_flops_per_token)
            where = f"base TP{src}" + ("" if src == tp else f" (TP{tp} not in the base: nearest TP, per-GPU share x{share:g})")
            split = (f"weight streaming {stream_b * 1e3:.3g} ms ({bw_source}) x streamed bytes per GPU "
                     f"{r_stream * share:.4g} + overhead {over_b * 1e3:.3g} ms x layers {r_layers:.4g}")
            source = (f"derived from {base.name} {phase} {where}: base_s = {split}; per_request_s x linear FLOPs per "
                      f"GPU {r_lin * share:.4g}" + (f" + sliding-window KV reads {window_s:.3g} s" if window_s else "")
                      + f"; per_context_token_s x full-attention KV bytes per GPU {r_kv * share:.4g}; per_token_s x "
                      f"linear FLOPs per GPU {r_lin * share:.4g}"
                      + (f" x (1 + window attention {window_flops / n.linear_flops_per_token:.3g})" if window_flops else ""))
            entries[phase].append(Coefficients(
                tp=tp, base_s=_round(base_s), per_request_s=_round(c.per_request_s * r_lin * share + window_s),
                per_context_token_s=_round(c.per_context_token_s * r_kv * share), per_token_s=_round(per_token),
                source=source))
    cr = base.clock_response
    power = []
    for tp in tps:
        # the same base TP degree as the coefficients: its curves carry that degree's all-reduce share
        # of a step. The weight share per GPU moves busy power too, and one base model cannot tell
        # the two apart (picking curves by weight share instead did better on TP2 models with half
        # the base's share and worse on 8B models at TP1, against ML.ENERGY)
        src = _nearest(tp, have)
        own = cr.power_curves(src)
        if own is cr:
            continue  # the shared curves apply
        power.append(TpPower(tp=tp, prefill_mem_power_w=own.prefill_mem_power_w,
                             prefill_comp_power_w=own.prefill_comp_power_w,
                             decode_mem_power_w=own.decode_mem_power_w, decode_comp_power_w=own.decode_comp_power_w,
                             source=f"{base.name}'s TP{src} busy power curves, kept (same GPU"
                                    + (")" if src == tp else f"; TP{tp} not in the base: nearest TP)")))
    skipped = "; ".join(f"TP{f.tp}: {f.reason}" for f in fits if not f.fits)
    model = Model(
        name=n.name, layers=n.layers, hidden_size=n.hidden_size, kv_heads=n.kv_heads, head_dim=n.head_dim,
        params=n.params, bytes_per_param=n.bytes_per_param, kv_block_tokens=base.model.kv_block_tokens,
        attention_pair_token_equiv=_round(attn_equiv),
        source=(f"config.json geometry ({n.layers} layers, hidden {n.hidden_size}, {n.heads} heads / {n.kv_heads} KV "
                f"heads x {n.head_dim}, MLP {n.intermediate_size}, vocabulary {n.vocab_size}, tied embeddings "
                f"{str(n.tie_word_embeddings).lower()}, {n.dtype}"
                + (f", {n.sliding_layers} sliding-window layers of {n.sliding_window} tokens" if n.sliding_layers else "")
                + f"); params {n.params:,} counted from it (layers, norms, embeddings); KV blocks of "
                f"{base.model.kv_block_tokens} tokens as {base.name}; KV capacity counts every layer's full KV "
                f"(an engine that bounds sliding layers' KV holds more); attention_pair_token_equiv: attention FLOPs per "
                f"pair (4 x heads x head_dim x full-attention layers) over linear FLOPs per token, relative to the base"
                + (f"; not fitting: {skipped}" if skipped else "")),
    )
    gpu = base.gpu if bw is None or base.gpu.memory_bandwidth_bytes_per_s else msgspec.structs.replace(
        base.gpu, memory_bandwidth_bytes_per_s=int(bw), source=f"{base.gpu.source}; memory_bandwidth_bytes_per_s: {bw_source}")
    return ProfileConfig(
        format=base.format, name=name,
        description=(f"{base.gpu.name} x {n.name} ({n.dtype}), TP {'/'.join(map(str, tps))}; derived from "
                     f"{base.name} by `dualscale profile derive` (model geometry only: no measurement of this model)"),
        gpu=gpu, model=model,
        clock_response=msgspec.structs.replace(cr, power_by_tp=power,
                                               source=f"kept from {base.name} (same GPU): {cr.source}"),
        latency=Latency(prefill=entries["prefill"], decode=entries["decode"],
                        source=f"each entry scaled from {base.name} by the model's work per GPU (profile/derive.py)"),
    )


def _bandwidth(base: ProfileConfig) -> tuple[float | None, str]:
    if base.gpu.memory_bandwidth_bytes_per_s:
        bw = base.gpu.memory_bandwidth_bytes_per_s
        return float(bw), f"{bw / 1e12:.3g} TB/s from {base.name}'s gpu.memory_bandwidth_bytes_per_s"
    if base.gpu.name in DATASHEET_BANDWIDTH:
        bw, src = DATASHEET_BANDWIDTH[base.gpu.name]
        return float(bw), src
    return None, "GPU bandwidth unknown: the whole base_s scaled with the streamed bytes"


def to_toml(cfg: ProfileConfig) -> bytes:
    header = (
        "# Generated by `dualscale profile derive` from the model's config.json and a base profile of the\n"
        "# same GPU. No measurement of this model went into it: calibrate before trusting it. Units are in\n"
        "# the field names; `source` says how every number was derived. Model: dualscale/profile/schema.py.\n"
    )
    return dump_toml(cfg, header)
