"""``dualscale profile fit``: rebuild the committed H100 x Llama-3.3-70B profile from public data.

Which source the profile follows, and why:

* Per-iteration latency and power vs batch and clock, TP2/TP4: the DualScale authors' own
  LightGBM models (``biscale_authors_models``), only at their seven profiled clocks, inside the
  training ranges and not flagged suspect (their README: trusted nowhere else).
* Decode step time and power vs batch at the top clock: ML.ENERGY (measured, default clocks,
  i.e. up to 1980 MHz), weighted above the authors' grid where the two disagree at large batch.
  ML.ENERGY does not publish its prompt lengths: the mean prompt is an assumption
  (``MLENERGY_PROMPT_TOKENS``), and the validation reports how sensitive the check is to it.
* Power form: idle floor + memory busy power x the memory system's busy fraction (mem / time)
  + tensor-core busy power x theirs (comp / time), i.e. each kind of work costs energy in
  proportion to how long it keeps its unit busy. Fitted per TP degree and per knot by linear
  least squares (relative error) on the busy fractions the fitted latency model gives each row.
* Prefill busy power (memory and compute curves): the authors' simulator power table (smoother
  than their tree power model), rows below 97 % of the cap (capped rows only say P >= cap).
* Decode busy power: memory curve on the authors' decode power model (rows with batch < 512:
  their README lists decode at batch 512-1024 among the tree model's bad extrapolations, e.g.
  159 W/GPU at TP4 x 512 x 1830 MHz) plus ML.ENERGY at 1980 MHz for TP4; compute curve = the
  same TP's prefill compute curve (tensor-core work draws the same power in either phase, and
  decode's compute fraction is too small to pin a curve of its own). The batch trend of decode
  power (ML.ENERGY: 447 W/GPU at batch 8, 630 W/GPU at 256) then follows from the growing
  tensor-core busy fraction; ML.ENERGY only sets the TP4 1980 MHz memory knot (a fit without
  ML.ENERGY's batches above 40 predicts their power within 5 % MAPE: ``profile validate``
  reports it).
* Per TP: TP2 and TP4 each get their own busy power curves; a TP2 GPU holds twice a TP4 GPU's
  share of the weights and streams them faster per GPU (at equal work TP2 draws a median 16 %
  more per GPU in the LUT, 13 % in the decode model). TP4's curves are the profile's shared
  curves, TP2's an override (``[[clock_response.power_by_tp]]``). TP8 has no per-iteration power data and
  uses TP4's curves: an upper bound (the serving sweep's lowest-load power per GPU at 1830 MHz
  is 0.89x TP4's at TP8, idle gaps included).
* Idle floor vs clock: the authors' simulator idle table (TP4, per GPU), shared by every TP.
* 1980 MHz and 345 MHz lie outside the authors' clocks: the slowdown curves continue their last
  (first) segment linearly in 1/f, i.e. the clock law with the elasticity measured there, and
  power continues linearly in f, then the 700 W cap applies at evaluation. The TP4 decode
  memory-power knot at 1980 MHz is fitted on ML.ENERGY, the only measurement at that clock.
* TP8: the TP4 coefficients scaled by measured TP8/TP4 ratios: memory-bound terms by the
  serving sweep's P99 TPOT ratio at 1830 MHz, compute-bound terms by Splitwise's batch-1 prompt
  time ratio (prompts >= 1024 tokens). Splitwise's absolute H100 prefill times come from an older
  stack and run slower than vLLM; only the ratio is used (``dualscale profile validate`` reports it).
* KV capacity: usable memory per GPU fitted to DistServe's measured TP2/TP4 capacities with the
  weight and KV sizes from the model geometry.

The fit is well-posed: every coefficient is pinned by data or by a stated prior (decode's per-token
compute time is pulled toward prefill's: the same tokens pass through the same linear layers), so
refits from other start points, with the rows in another order or on another BLAS agree within
1e-4 relative (tests/test_fit.py checks 1e-3). Results are rounded to 6 significant digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
from numpy.typing import NDArray
from scipy.optimize import least_squares

from dualscale.profile import datasets as ds
from dualscale.profile.schema import (
    FORMAT,
    POWER_CURVES,
    ClockResponse,
    Coefficients,
    Gpu,
    Latency,
    Model,
    ProfileConfig,
    TpPower,
    dump_toml,
)

PROFILE_NAME = "h100-sxm-llama-3.3-70b"
REFERENCE_MHZ = 1830.0
EXTENDED_KNOTS_MHZ = (345.0, 1980.0)
#: Assumed mean prompt of ML.ENERGY's lm-arena-chat requests (not published by the benchmark).
MLENERGY_PROMPT_TOKENS = 1000
#: ML.ENERGY rows count this many times an authors' row in the decode fit (measured vs modelled).
MLENERGY_WEIGHT = 3.0
#: Prefill power rows at or above this share of the cap are capped; they only need P >= cap.
CAP_SHARE = 0.97
#: Authors' decode power rows at this batch or above are left out of the power fit: their README
#: (caveat 2) lists decode at batch 512-1024 among the tree model's known bad extrapolations.
DECODE_POWER_MAX_BATCH = 512
#: The TP degree whose busy power curves are the profile's shared ones (used by TP8 too).
SHARED_POWER_TP = 4
#: Weight of the prior pulling decode's per-token compute time toward prefill's of the same TP,
#: per unit of log-ratio (a data row's residual is its relative error, weight 1). Decode batches
#: are mostly memory-bound, so the data barely constrain that coefficient (TP2: anywhere from
#: 1e-11 to 2e-7 s without the prior, depending on BLAS and start point); the prior pins it and
#: is weak enough that the data decide wherever they say anything (ML.ENERGY's large TP4 batches).
#: 0.1 keeps every `profile validate` number within 0.02 points of the fit without it.
PRIOR_WEIGHT = 0.1
#: Solver tolerances (scipy's default 1e-8 stops where restarts still differ by ~1e-4 relative).
XTOL = 1e-12

GPU = Gpu(
    name="NVIDIA H100 80GB HBM3 (SXM5)",
    memory_bytes=81559 * 2**20,
    usable_memory_bytes=1,  # replaced by the fit
    power_cap_w=700.0,
    clock_min_mhz=345,
    clock_max_mhz=1980,
    clock_step_mhz=15,
    source=(
        "NVIDIA H100 SXM5 datasheet: 700 W TDP, SM clocks 345-1980 MHz in 15 MHz steps "
        "(nvmlDeviceGetSupportedGraphicsClocks), 81559 MiB total; usable_memory_bytes: fit to "
        "DistServe max_num_tokens (biscale_authors_sim/kv_capacity_tokens.csv)"
    ),
)

MODEL = Model(
    name="meta-llama/Llama-3.3-70B-Instruct",
    layers=80,
    hidden_size=8192,
    kv_heads=8,
    head_dim=128,
    params=70_553_706_496,
    bytes_per_param=2,
    kv_block_tokens=64,
    source=(
        "model card config.json (80 layers, hidden 8192, 8 KV heads x 128, bf16, 70.55 B params); "
        "64-token KV blocks as in the authors' DistServe simulator"
    ),
)


@dataclass(frozen=True)
class FitInputs:
    """Everything the fit reads, as arrays (tests build these synthetically)."""

    prefill: ds.Batches  # time_s and power_w per row (authors' grid)
    decode: ds.Batches  # time_s and power_w per row (authors' grid)
    decode_top: ds.Batches  # measured decode steps at the GPU's top clock (ML.ENERGY)
    prefill_power: ds.Batches  # single-chunk prefill rows with busy power (time_s unused)
    idle_freq_mhz: NDArray[np.float64]
    idle_power_w: NDArray[np.float64]
    kv_capacity_tokens: dict[int, int]
    tp8_mem_ratio: float
    tp8_comp_ratio: float


def mlenergy_as_batches(m: ds.MlEnergyDecode, freq_mhz: float, prompt_tokens: int) -> ds.Batches:
    """ML.ENERGY rows as decode batches: contexts = prompt + the output-weighted mean progress."""
    batches, tp, freq = [], [], []
    for b, out in zip(m.batch, m.avg_output_tokens):
        n = max(1, round(b))
        # a running request is on average half-way through its output, weighted by length
        mean_ctx = prompt_tokens + 0.5 * out
        batches.append(ds.spread_contexts(n, mean_ctx, 0.3 * mean_ctx))
        tp.append(4)
        freq.append(freq_mhz)
    return ds.pack(tp, freq, batches, list(m.itl_s), list(m.power_w))


def load_inputs(data_dir: Path, prompt_tokens: int = MLENERGY_PROMPT_TOKENS) -> FitInputs:
    """Read every dataset the fit uses from ``data_dir`` (the shared data folder)."""
    lut = ds.authors_prefill_power_lut(data_dir)
    prefill_power = ds.pack(
        list(lut.tp), list(lut.freq_mhz), [[int(t)] for t in lut.tokens],
        [float("nan")] * len(lut.tp), list(lut.power_w),
    )
    idle_f, idle_w = ds.authors_idle_power(data_dir, tp=4)
    sweep = ds.serving_sweep_lowest_load(data_dir)
    at = {(int(t), float(f)): s for t, f, s in zip(sweep.tp, sweep.freq_mhz, sweep.tpot_s)}
    sw = ds.splitwise_h100(data_dir)
    comp = [sw[(8, "prompt", s, 1)] / sw[(4, "prompt", s, 1)] for s in (1024, 2048, 4096, 8192)]
    return FitInputs(
        prefill=ds.authors_prefill(data_dir),
        decode=ds.authors_decode(data_dir),
        decode_top=mlenergy_as_batches(ds.mlenergy_decode(data_dir), GPU.clock_max_mhz, prompt_tokens),
        prefill_power=prefill_power,
        idle_freq_mhz=idle_f,
        idle_power_w=idle_w,
        kv_capacity_tokens=ds.kv_capacity_tokens(data_dir),
        tp8_mem_ratio=at[(8, REFERENCE_MHZ)] / at[(4, REFERENCE_MHZ)],
        tp8_comp_ratio=float(np.median(comp)),
    )


# ---- features: the same work formulas as the kernels, row by row ------------------------------
def features(b: ds.Batches, phase: str, attn_equiv: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per row: memory design [1, n, context] and compute work in token-equivalents."""
    xm = np.zeros((len(b), 3))
    xc = np.zeros(len(b))
    for i in range(len(b)):
        t = b.batch(i).astype(np.float64)
        if phase == "prefill":  # fitted rows have no prefix
            xm[i] = (1.0, len(t), 0.0)
            xc[i] = t.sum() + attn_equiv * (0.5 * t * (t + 1.0)).sum()
        else:
            xm[i] = (1.0, len(t), t.sum())
            xc[i] = len(t) + attn_equiv * t.sum()
    return xm, xc


def extend_inv(knots: NDArray[np.float64], s: NDArray[np.float64], at: float) -> float:
    """Continue the nearest end segment of ``s(knots)`` linearly in 1/f to clock ``at``."""
    i, j = (0, 1) if at < knots[0] else (-2, -1)
    slope = (s[j] - s[i]) / (1.0 / knots[j] - 1.0 / knots[i])
    return float(s[j] + slope * (1.0 / at - 1.0 / knots[j]))


def extend_lin(knots: NDArray[np.float64], y: NDArray[np.float64], at: float) -> float:
    """Continue the nearest end segment of ``y(knots)`` linearly in f to clock ``at``."""
    i, j = (0, 1) if at < knots[0] else (-2, -1)
    return float(y[j] + (y[j] - y[i]) / (knots[j] - knots[i]) * (at - knots[j]))


@dataclass(frozen=True)
class _Rows:
    xm: NDArray[np.float64]
    xc: NDArray[np.float64]
    group: NDArray[np.int64]  # index into groups
    knot: NDArray[np.int64]  # index into the full knot list
    time_s: NDArray[np.float64]
    weight: NDArray[np.float64]


def _latency_rows(inputs: FitInputs, knots: NDArray[np.float64], groups: list[tuple[str, int]],
                  attn: float) -> _Rows:
    parts = []
    for phase, b, w in (("prefill", inputs.prefill, 1.0), ("decode", inputs.decode, 1.0),
                        ("decode", inputs.decode_top, MLENERGY_WEIGHT)):
        if len(b) == 0:
            continue
        xm, xc = features(b, phase, attn)
        g = np.array([groups.index((phase, int(t))) for t in b.tp])
        k = np.array([int(np.flatnonzero(knots == f)[0]) for f in b.freq_mhz])
        parts.append((xm, xc, g, k, b.time_s, np.full(len(b), w)))
    return _Rows(*(np.concatenate(z) for z in zip(*parts)))


def _soft_roofline(
    a: NDArray[np.float64], c: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Time ``hypot(a, c)`` and the busy fractions ``a / time``, ``c / time`` (as the kernel computes them)."""
    m = np.maximum(a, c)
    ra, rc = a / m, c / m
    r = np.sqrt(ra * ra + rc * rc)
    return m * r, ra / r, rc / r


def _extend_ends(knots: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    """Fill NaN end knots (345/1980 MHz) by continuing the profiled curve linearly in f."""
    out = y.copy()
    for end in (0, -1):
        if np.isnan(out[end]):
            out[end] = extend_lin(knots[1:-1], out[1:-1], knots[end])
    return out


def fit(inputs: FitInputs, start_jitter: float = 0.0, seed: int = 0) -> ProfileConfig:
    """Fit the profile; pure function of ``inputs`` (deterministic).

    Args:
        inputs: the measurements (``load_inputs``).
        start_jitter: scale every start parameter by a random factor within exp(+/-start_jitter),
            drawn with ``seed``: the result must not depend on it (the stability test does this).
        seed: seed of that draw.
    """
    profiled = np.array(ds.AUTHORS_PROFILED_CLOCKS_MHZ, dtype=np.float64)
    knots = np.concatenate([[EXTENDED_KNOTS_MHZ[0]], profiled, [EXTENDED_KNOTS_MHZ[1]]])
    ref = int(np.flatnonzero(profiled == REFERENCE_MHZ)[0])
    free = [i for i in range(len(profiled)) if i != ref]
    attn = MODEL.attention_token_equiv
    tps = sorted({int(t) for t in inputs.prefill.tp})
    groups = [("prefill", t) for t in tps] + [("decode", t) for t in tps]
    rows = _latency_rows(inputs, knots, groups, attn)
    nf = len(free)

    def curves(x: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        out = []
        for part in (x[:nf], x[nf : 2 * nf]):
            s = np.ones(len(profiled))
            s[free] = np.exp(part)
            out.append(np.concatenate([[extend_inv(profiled, s, knots[0])], s,
                                       [extend_inv(profiled, s, knots[-1])]]))
        return out[0], out[1]

    # coefficient layout per group: [base, per_request, per_context, per_token]
    def coefs(x: NDArray[np.float64]) -> NDArray[np.float64]:
        th = np.exp(x[2 * nf : 2 * nf + 4 * len(groups)]).reshape(len(groups), 4)
        th[[i for i, g in enumerate(groups) if g[0] == "prefill"], 2] = 0.0
        return th

    def predict(x: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        sm, sc = curves(x)
        th = coefs(x)
        a = (rows.xm * th[rows.group, :3]).sum(1) * sm[rows.knot]
        c = rows.xc * th[rows.group, 3] * sc[rows.knot]
        return _soft_roofline(a, c)[0]

    # decode's per-token compute time is tied to prefill's of the same TP (the same tokens pass
    # through the same linear layers): without the tie it has a flat direction wherever decode
    # batches are too small for the compute term to matter, and the solver lands anywhere on it
    th0 = 2 * nf
    tie = np.array([[th0 + 4 * groups.index(("decode", t)) + 3, th0 + 4 * groups.index(("prefill", t)) + 3]
                    for t in tps])

    def residuals(x: NDArray[np.float64]) -> NDArray[np.float64]:
        prior = PRIOR_WEIGHT * (x[tie[:, 0]] - x[tie[:, 1]])
        return np.concatenate([rows.weight * (predict(x) / rows.time_s - 1.0), prior])

    x0 = np.concatenate([
        np.log(np.linspace(2.2, 1.02, nf)),  # memory-bound: weakly clock-sensitive
        np.log(REFERENCE_MHZ / profiled[free]),  # compute-bound: the clock law
        np.log(np.tile([0.015, 1e-5, 2e-8, 5e-5], len(groups))),
    ])
    # log-parameters: slowdowns within [e^-3, e^3], coefficients within [e^-40, 1] s
    lo = np.concatenate([np.full(2 * nf, -3.0), np.full(4 * len(groups), -40.0)])
    hi = np.concatenate([np.full(2 * nf, 3.0), np.full(4 * len(groups), 0.0)])
    x0 = x0 + np.random.default_rng(seed).uniform(-start_jitter, start_jitter, len(x0))
    sol = least_squares(residuals, np.clip(x0, lo, hi), bounds=(lo, hi), loss="soft_l1", f_scale=0.03, method="trf",
                        xtol=XTOL, ftol=XTOL, gtol=XTOL)
    sm, sc = curves(sol.x)
    th = coefs(sol.x)

    # ---- power: per TP and knot, linear least squares (relative error) of P - idle on the busy
    # fractions of the memory system and the tensor cores -------------------------------------
    idle = np.interp(profiled, inputs.idle_freq_mhz, inputs.idle_power_w)
    idle_k = np.concatenate([[extend_lin(profiled, idle, knots[0])], idle, [extend_lin(profiled, idle, knots[-1])]])

    def busy(b: ds.Batches, phase: str) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
        xm, xc = features(b, phase, attn)
        g = np.array([groups.index((phase, int(t))) for t in b.tp])
        k = np.array([int(np.flatnonzero(knots == f)[0]) for f in b.freq_mhz])
        _, um, uc = _soft_roofline((xm * th[g, :3]).sum(1) * sm[k], xc * th[g, 3] * sc[k])
        return k, um, uc

    n_req = np.diff(inputs.decode.offsets)
    decode_power = [inputs.decode.subset(n_req < DECODE_POWER_MAX_BATCH), inputs.decode_top]
    power: dict[int, dict[str, NDArray[np.float64]]] = {}
    for tp in tps:
        b = inputs.prefill_power.subset(inputs.prefill_power.tp == tp)
        k_all, um_all, uc_all = busy(b, "prefill")
        p_all = b.power_w
        mem_w, comp_w = np.full(len(knots), np.nan), np.full(len(knots), np.nan)
        for kk in range(len(knots)):
            m = (k_all == kk) & (p_all < CAP_SHARE * GPU.power_cap_w)
            if m.sum() < 2:
                continue
            A = np.stack([um_all[m], uc_all[m]], 1) / p_all[m, None]
            mem_w[kk], comp_w[kk] = np.linalg.lstsq(A, (p_all[m] - idle_k[kk]) / p_all[m], rcond=None)[0]
        comp_w = _extend_ends(knots, comp_w)
        curves = {"prefill_mem_power_w": _extend_ends(knots, mem_w), "prefill_comp_power_w": comp_w,
                  # tensor-core-bound work draws the same power in either phase; decode batches are
                  # mostly memory-bound, so their compute fraction is too small to pin a curve of its own
                  "decode_comp_power_w": comp_w}
        parts = [busy(d, "decode") + (d.power_w,) for d in (x.subset(x.tp == tp) for x in decode_power) if len(d)]
        k_all, um_all, uc_all, p_all = (np.concatenate(z) for z in zip(*parts))
        mem_w = np.full(len(knots), np.nan)
        for kk in range(len(knots)):
            m = (k_all == kk) & (p_all < CAP_SHARE * GPU.power_cap_w)
            if m.sum() < 2:
                continue
            y = (p_all[m] - idle_k[kk] - uc_all[m] * comp_w[kk]) / p_all[m]
            a = um_all[m] / p_all[m]
            mem_w[kk] = float(a @ y / (a @ a))
        curves["decode_mem_power_w"] = _extend_ends(knots, mem_w)
        power[tp] = curves

    # ---- TP8 from TP4, KV memory ---------------------------------------------------------
    lat: dict[str, list[Coefficients]] = {"prefill": [], "decode": []}
    src_fit = ("least-squares fit (soft-L1, relative error) on biscale_authors_models trusted rows "
               "at the 7 profiled clocks")
    for (phase, tp), v in zip(groups, th):
        per_ctx = float(v[2]) if phase == "decode" else float(th[groups.index(("decode", tp)), 2])
        src = src_fit + (f" + ML.ENERGY TP4 decode (weight {MLENERGY_WEIGHT:g}, assumed prompt "
                         f"{MLENERGY_PROMPT_TOKENS} tokens)" if (phase, tp) == ("decode", 4) else "")
        if phase == "prefill":
            src += "; per_context_token_s: assumed equal to decode's (prefix KV read)"
        else:
            src += (f"; per_token_s: weak prior toward prefill's TP{tp} value (same linear layers; weight "
                    f"{PRIOR_WEIGHT:g} per unit log-ratio), decode data decide where they can")
        lat[phase].append(Coefficients(tp=tp, base_s=v[0], per_request_s=v[1], per_context_token_s=per_ctx,
                                       per_token_s=v[3], source=src))
    for phase in ("prefill", "decode"):
        c4 = next(c for c in lat[phase] if c.tp == 4)
        lat[phase].append(Coefficients(
            tp=8, base_s=c4.base_s * inputs.tp8_mem_ratio, per_request_s=c4.per_request_s * inputs.tp8_mem_ratio,
            per_context_token_s=c4.per_context_token_s * inputs.tp8_mem_ratio,
            per_token_s=c4.per_token_s * inputs.tp8_comp_ratio,
            source=(f"TP4 x measured TP8/TP4 ratios: memory-bound x {inputs.tp8_mem_ratio:.4g} (serving sweep "
                    f"P99 TPOT at 1830 MHz), compute-bound x {inputs.tp8_comp_ratio:.4g} (Splitwise H100 "
                    "batch-1 prompt time, prompts 1024-8192)"),
        ))
    kvb = MODEL.kv_bytes_per_token
    caps = inputs.kv_capacity_tokens
    usable = sum(t * (c * kvb + MODEL.weight_bytes) for t, c in caps.items()) / sum(t * t for t in caps)

    if SHARED_POWER_TP not in power:
        raise ValueError(f"fit inputs cover TP {tps}: the shared power curves need TP{SHARED_POWER_TP}")
    shared = power[SHARED_POWER_TP]
    cr = ClockResponse(
        knots_mhz=list(knots), reference_mhz=REFERENCE_MHZ,
        mem_slowdown=list(sm), comp_slowdown=list(sc), idle_power_w=list(idle_k),
        **{name: list(shared[name]) for name in POWER_CURVES},
        source=(
            "slowdowns: fit with the coefficients (biscale_authors_models, 7 profiled clocks; ML.ENERGY at "
            "1980 MHz), 345/1980 MHz continued linearly in 1/f; idle: biscale_authors_sim prefill idle floor "
            f"(TP4, simulator variant); busy power curves: TP{SHARED_POWER_TP}'s, shared by every TP degree "
            f"without a power_by_tp entry (TP8: no power data, assumed equal to TP{SHARED_POWER_TP}), "
            + _power_source(SHARED_POWER_TP, SHARED_POWER_TP in inputs.decode_top.tp)
        ),
        power_by_tp=[
            TpPower(tp=tp, **{name: list(power[tp][name]) for name in POWER_CURVES},
                    source=_power_source(tp, tp in inputs.decode_top.tp))
            for tp in tps if tp != SHARED_POWER_TP
        ],
    )
    cfg = ProfileConfig(
        format=FORMAT,
        name=PROFILE_NAME,
        description="NVIDIA H100 SXM5 x Llama-3.3-70B-Instruct (bf16), TP 2/4/8; built by `dualscale profile fit`",
        gpu=msgspec.structs.replace(GPU, usable_memory_bytes=int(round(usable))),
        model=MODEL,
        clock_response=cr,
        latency=Latency(prefill=lat["prefill"], decode=lat["decode"],
                        source="per-entry sources below; form: soft roofline (schema.py)"),
    )
    return _rounded(cfg)


def _power_source(tp: int, at_top: bool) -> str:
    """``source`` of TP ``tp``'s busy power curves; ``at_top``: ML.ENERGY decode rows cover this TP."""
    return (
        f"per-knot least squares (relative error) of TP{tp} power above idle on the busy fractions of memory and "
        f"tensor cores: prefill on the biscale_authors_sim power LUT (rows below {CAP_SHARE * 100:g} % of the cap); "
        f"decode memory power on biscale_authors_models decode power (batches below {DECODE_POWER_MAX_BATCH}: "
        "their README, caveat 2)" + (f" + ML.ENERGY TP{tp} decode at 1980 MHz" if at_top else "")
        + "; decode compute power = prefill's; knots without data (prefill 345/1980 MHz, decode 345"
        + ("" if at_top else "/1980") + " MHz) continued linearly in f; the 700 W cap applies at evaluation"
    )


def _round(x: object) -> object:
    if isinstance(x, (float, np.floating)):
        return float(f"{float(x):.6g}")
    if isinstance(x, list):
        return [_round(v) for v in x]
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    return x


def _rounded(cfg: ProfileConfig) -> ProfileConfig:
    return msgspec.convert(_round(msgspec.to_builtins(cfg, enc_hook=float)), ProfileConfig)


def to_toml(cfg: ProfileConfig) -> bytes:
    header = (
        "# Generated by `dualscale profile fit`; edit by re-running it (or replace [clock_response]\n"
        "# with a sweep of your own hardware). Units are in the field names; `source` says where\n"
        "# every number comes from. Model: see dualscale/profile/schema.py.\n"
    )
    return dump_toml(cfg, header)
