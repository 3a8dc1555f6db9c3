"""The ``dualscale`` command. Each subcommand's ``--help`` explains what it does and shows an example."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from dualscale._files import write_atomic
from dualscale._version import __version__
from dualscale.errors import DualscaleError
from dualscale.runtime import cli as runtime_cli

if TYPE_CHECKING:
    from dualscale.sim.scenario import Scenario

DEFAULT_PROFILE = "h100-sxm-llama-3.3-70b"
DEFAULT_DATA = Path("../shared/data")
SHOW_CLOCKS_MHZ = (345, 570, 780, 1080, 1380, 1680, 1830, 1980)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dualscale",
        description=(
            "Energy-aware GPU clock control for prefill/decode-disaggregated LLM serving.\n"
            "Start with `dualscale profile show` to see what one GPU x model costs at each clock."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"dualscale {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prof = sub.add_parser("profile", help="inspect, fit and validate latency/power profiles",
                          description="Latency and power of one (GPU, model) pair vs batch and SM clock.")
    psub = prof.add_subparsers(dest="action", required=True, metavar="ACTION")

    show = psub.add_parser(
        "show", help="tables of latency, power and energy per token vs clock",
        description=(
            "Print, for each TP degree, the time, per-GPU power and energy per token of a prefill batch and\n"
            "a decode step at a set of clocks, plus the idle power and the KV capacity.\n\n"
            "example: dualscale profile show h100-sxm-llama-3.3-70b --tp 4 --prefill-tokens 2048 --decode-batch 64"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("profile", nargs="?", default=DEFAULT_PROFILE,
                      help=f"built-in profile name or path to a profile TOML (default: {DEFAULT_PROFILE})")
    show.add_argument("--tp", type=int, action="append", help="TP degree to show (repeatable; default: all)")
    show.add_argument("--clocks-mhz", type=int, nargs="+", default=list(SHOW_CLOCKS_MHZ), metavar="MHZ",
                      help="clocks to tabulate (default: %(default)s)")
    show.add_argument("--prefill-tokens", type=int, default=1024, help="prompt tokens of the prefill batch (default: 1024)")
    show.add_argument("--decode-batch", type=int, default=32, help="requests in the decode batch (default: 32)")
    show.add_argument("--decode-context", type=int, default=1024, help="context tokens per decode request (default: 1024)")

    sweep = psub.add_parser(
        "sweep", help="record telemetry of your own node over a grid of locked clocks, for `profile fit`",
        description=(
            "Take the controller's place (same runtime config, key and sockets as `dualscale serve`; run it\n"
            "instead of serve, unprivileged) and lock every instance at each clock of a grid in turn, holding\n"
            "each for --dwell-s while load runs through the engines (your own benchmark client, or --load-url\n"
            "for the built-in generator against an OpenAI-compatible endpoint). Every iteration the engines\n"
            "report (batch shape, measured time, clock read back) and the actuators' power windows are recorded\n"
            "to --out, as `serve --record` does; then `dualscale profile fit --telemetry OUT`. Shows progress\n"
            "and the time left; Ctrl-C stops it, and --resume continues with the clocks not yet done.\n\n"
            "examples:\n"
            "  dualscale profile sweep --config deploy.toml --out node3.jsonl --steps 8 --dwell-s 60 \\\n"
            "      --load-url http://127.0.0.1:8000/v1/completions --load-model meta-llama/Llama-3.3-70B-Instruct\n"
            "  dualscale profile sweep --config deploy.toml --out node3.jsonl --steps 8 --dwell-s 60 --resume\n"
            "  dualscale profile fit --telemetry node3.jsonl --base h100-sxm-llama-3.3-70b --out node3.toml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("--config", default="example", help="runtime config name or TOML path (default: %(default)s)")
    sweep.add_argument("--out", type=Path, required=True, metavar="FILE", help="telemetry to write (JSON Lines)")
    grid = sweep.add_mutually_exclusive_group()
    grid.add_argument("--clocks-mhz", type=int, nargs="+", metavar="MHZ", help="the clocks to hold, in this order")
    grid.add_argument("--steps", type=int, default=8,
                      help="clocks spread evenly over the GPU's range, ends included (default: %(default)s)")
    sweep.add_argument("--dwell-s", type=float, default=60.0, help="how long each clock is held (default: %(default)s)")
    sweep.add_argument("--window-s", type=float, default=1.0, help="power window length, s (default: %(default)s)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep into the same --out")
    sweep.add_argument("--load-url", help="send load to this OpenAI-compatible completions endpoint while sweeping")
    sweep.add_argument("--load-model", default="", help="the model name for --load-url")
    sweep.add_argument("--load-rate", type=float, default=2.0, help="requests/s for --load-url (default: %(default)s)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")

    fit = psub.add_parser(
        "fit", help="calibrate a profile from telemetry, or rebuild the built-in one from public data",
        description=(
            "With --telemetry: calibrate a profile from a recording of your own node (`dualscale serve\n"
            "--record FILE`, or a sweep): the same model forms as the built-in profile, fitted to the\n"
            "recorded iterations (batch shape, time, clock read back) and power windows. What the\n"
            "telemetry cannot pin (TP degrees, clocks outside the range it visited, GPU and model\n"
            "geometry, KV capacity) comes from --base; the output's `source` fields say which is which.\n"
            "Fails, naming what to collect, on too few clocks or batch shapes, a locked clock that was never\n"
            "reached, or missing power windows. See dualscale/profile/fit_telemetry.py.\n\n"
            "Without --telemetry: fit the H100 x Llama-3.3-70B profile from the shared data folder\n"
            "(deterministic); see dualscale/profile/fit.py for which source each number follows.\n\n"
            "examples:\n"
            "  dualscale profile fit --telemetry node3.jsonl --base h100-sxm-llama-3.3-70b --out my.toml\n"
            "  dualscale profile validate --telemetry node3-later.jsonl my.toml\n"
            "  dualscale profile fit --data ../shared/data --out configs/profiles/h100-sxm-llama-3.3-70b.toml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("--telemetry", type=Path, metavar="FILE",
                     help="telemetry to calibrate from (JSON Lines; rotated FILE.1 ... are read too)")
    fit.add_argument("--base", default=DEFAULT_PROFILE, metavar="PROFILE",
                     help=f"with --telemetry: profile of the same GPU to start from (default: {DEFAULT_PROFILE})")
    fit.add_argument("--name", help="with --telemetry: profile name (default: the --out file's stem)")
    fit.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (default: %(default)s)")
    fit.add_argument("--out", type=Path, default=None,
                     help="where to write the profile TOML (default: print to stdout)")

    der = psub.add_parser(
        "derive", help="a starting profile for another dense model on a profiled GPU, from its config.json",
        description=(
            "Scale a base profile of the same GPU to another dense transformer, from its Hugging Face\n"
            "config.json (layers, hidden size, heads, KV heads, head_dim, MLP width, vocabulary, dtype,\n"
            "tied embeddings, sliding windows). The GPU's clock and power curves are kept; each latency\n"
            "term is scaled by the model's work per GPU: weight bytes streamed per step (+ per-layer\n"
            "overhead), KV bytes per context token, linear-layer and attention FLOPs per token. Every TP\n"
            "degree of 1, 2, 4, 8 the model fits in is written (weights + --min-kv-tokens of KV per\n"
            "instance); a degree the base lacks (TP1) is scaled from the nearest one. Every number says\n"
            "where it came from (`source`). No measurement of the new model goes in: check the result\n"
            "with `dualscale profile show` and calibrate on your own node when you can.\n\n"
            "Refused, naming the field: missing or absurd geometry, mixture-of-experts, state-space\n"
            "hybrids, quantized checkpoints, a dtype other than the base's.\n\n"
            "examples:\n"
            "  dualscale profile derive --config path/to/config.json --from h100-sxm-llama-3.3-70b --out my.toml\n"
            "  dualscale profile derive --config Qwen/Qwen3-8B --out qwen3-8b.toml   # a shipped config, by id\n"
            "  dualscale profile show my.toml --tp 1"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    der.add_argument("--config", required=True, metavar="CONFIG_JSON",
                     help="the model's config.json, or the id of a shipped one (configs/models: e.g. Qwen/Qwen3-8B)")
    der.add_argument("--from", dest="base", default=DEFAULT_PROFILE, metavar="PROFILE",
                     help=f"base profile (built-in name or TOML) of the same GPU (default: {DEFAULT_PROFILE})")
    der.add_argument("--out", type=Path, default=None, help="where to write the profile TOML (default: stdout)")
    der.add_argument("--name", help="profile name (default: the --out file's stem)")
    der.add_argument("--base-config", metavar="CONFIG_JSON",
                     help="the base model's config.json (default: the shipped config of the base profile's model)")
    der.add_argument("--min-kv-tokens", type=int, default=4096,
                     help="KV cache an instance must hold besides the weights for a TP degree to count "
                          "(default: %(default)s)")

    val = psub.add_parser(
        "validate", help="error of a profile on every public dataset it follows",
        description=(
            "Report MAPE and max error of the profile on each dataset, with its target. Form checks on\n"
            "other GPUs (L4, A100/A40) refit the interpolation laws and score only held-out clocks.\n"
            "Held-out models: the profile is scaled (`profile derive`) to every shipped model config with\n"
            "ML.ENERGY H100 rows and scored on them (median error per model; target on the median over\n"
            "models).\n"
            "Exit status 1 when a target is missed.\n\n"
            "With --telemetry FILE: instead, the profile's error on a recording of your node (time of every\n"
            "iteration, mean power of every power window); with --fitted-on TRAIN, only on what the fit on\n"
            "TRAIN never saw (iterations at other clocks or of other batch shapes, windows at other clocks).\n\n"
            "examples:\n"
            "  dualscale profile validate --json > validation.json\n"
            "  dualscale profile validate my.toml --telemetry later.jsonl --fitted-on node3.jsonl"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    val.add_argument("profile", nargs="?", default=DEFAULT_PROFILE, help="profile name or TOML path")
    val.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (default: %(default)s)")
    val.add_argument("--json", action="store_true", help="print JSON instead of a table")
    val.add_argument("--telemetry", type=Path, metavar="FILE", help="score the profile on this telemetry instead")
    val.add_argument("--fitted-on", type=Path, metavar="TRAIN",
                     help="with --telemetry: score only what this telemetry (the fit's) does not contain")

    sim = sub.add_parser(
        "simulate", help="replay a trace through a simulated P/D cluster under clock policies",
        description=(
            "Simulate a prefill/decode-disaggregated cluster on a request trace under each policy and compare\n"
            "energy per phase and TTFT/TPOT against the SLOs. With no options: the built-in default scenario\n"
            "(16 x H100, Llama-3.3-70B, prefill TP2 x 4 + decode TP4 x 2, Azure conv 2023, one hour),\n"
            "distserve vs dualscale.\n\n"
            "policies: distserve (top clock), static:<MHz>, dualscale (prefill MPC + decode slack),\n"
            "          lowest-feasible (throttLL'eM-style), rules (VoltanaLLM-style feedback)\n"
            "traces:   azure-conv, azure-code, mooncake-conv, gamma (synthetic: --rate, --cv, --duration),\n"
            "          or a CSV/JSONL file with arrival time, input and output tokens\n\n"
            "examples:\n"
            "  dualscale simulate\n"
            "  dualscale simulate --trace azure-code --duration 600 --policy distserve --policy rules --json out.json\n"
            "  dualscale simulate --trace gamma --rate 20 --cv 1.41 --duration 300 --plots plots/\n"
            "  dualscale simulate --load 0.5 --scaling downsample   # every second request, original timestamps\n"
            "  dualscale simulate --latency-bias 0.2 --latency-noise 0.05   # GPUs 20 %% slower than the profile, noisy\n"
            "  dualscale simulate --latency-bias 0.2 --no-correction        # ... with the online correction off\n\n"
            "model error: the simulated GPUs follow the scenario's [truth] table (default: the profile itself);\n"
            "the --latency-*/--power-*/--clock-shape-error/--power-cap-w/--switch-jitter options override it.\n"
            "The controllers never see the truth, only each iteration's measured time, clock and power."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = sim.add_mutually_exclusive_group()
    where.add_argument("--scenario", default="default", help="built-in scenario name (default: %(default)s)")
    where.add_argument("--config", type=Path, help="scenario TOML file (see configs/scenarios/default.toml)")
    sim.add_argument("--trace", help="trace name or file (default: the scenario's)")
    load = sim.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="target arrival rate, requests/s")
    load.add_argument("--load", type=float, help="target rate as a fraction of the trace's own rate")
    sim.add_argument("--scaling", choices=["downsample", "time"],
                     help="reach the rate by keeping evenly spaced requests (the paper's method) or by rescaling time")
    sim.add_argument("--start", type=float, help="window start, s since the trace's first request")
    sim.add_argument("--duration", type=float, help="window length, s (gamma: how long to generate)")
    sim.add_argument("--cv", type=float, help="gamma arrivals: coefficient of variation (default 1.41)")
    sim.add_argument("--seed", type=int, help="gamma arrivals: random seed (default 0)")
    sim.add_argument("--policy", action="append", metavar="P",
                     help="policy to run (repeatable; default: distserve and dualscale)")
    sim.add_argument("--json", type=Path, metavar="PATH", help="write one summary record per policy here")
    sim.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots here")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    truth = sim.add_argument_group("ground truth (how the simulated GPUs differ from the profile)")
    truth.add_argument("--latency-bias", type=float, metavar="F",
                       help="every iteration F slower than the profile says, both phases (0.2 = 20 %%; -0.1 faster)")
    truth.add_argument("--latency-noise", type=float, metavar="S",
                       help="lognormal per-iteration time noise, sigma of the log (0.05 ~ 5 %%)")
    truth.add_argument("--clock-shape-error", type=float, metavar="F",
                       help="slowdown below the top clock F steeper (> 0) or flatter (< 0) than the profile's")
    truth.add_argument("--power-bias", type=float, metavar="F", help="power F above the profile's, both phases")
    truth.add_argument("--power-cap-w", type=float, metavar="W",
                       help="per-GPU power cap: above it a GPU runs at the highest clock that fits")
    truth.add_argument("--switch-jitter", type=float, metavar="J",
                       help="each TP rank's clock switch delay drawn in delay x (1 +/- J); the slowest rank sets the pace")
    sim.add_argument("--no-correction", action="store_true",
                     help="controllers ignore measured iterations (no online model correction), for comparison")

    plan = sub.add_parser(
        "plan", help="coarse tier: instances, TP and baseline clocks for a load (goodput table + ILP)",
        description=(
            "Measure (or load from the cache) the goodput table of every (phase, TP, baseline clock) on a trace,\n"
            "then solve the placement ILP for the predicted rate: instances per phase with TP and baseline clock,\n"
            "routing weights, predicted power and energy. The rate defaults to the trace's first window.\n\n"
            "examples:\n"
            "  dualscale plan --trace azure-conv --gpus 16\n"
            "  dualscale plan --trace azure-code --gpus 16 --rate 3.5 --objective paper --json plan.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _coarse_options(plan)
    plan.add_argument("--trace", default="azure-conv", help="trace name or file (default: %(default)s)")
    plan.add_argument("--gpus", type=int, default=16, help="GPU budget (default: %(default)s)")
    plan.add_argument("--rate", type=float, help="predicted rate, req/s (default: the first window's)")
    plan.add_argument("--alpha", type=float, default=0.05, help="capacity headroom (default: %(default)s)")
    plan.add_argument("--window", type=float, default=300.0, help="window, s: goodput is measured on the first one (default: %(default)s)")
    plan.add_argument("--objective", choices=["load", "paper"], default="load",
                      help="load: power at the predicted load (ours); paper: every instance at its goodput (default: %(default)s)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    ev = sub.add_parser(
        "evaluate", help="the paper's comparison: DistServe vs PlaceOnly vs DualScale in the simulator",
        description=(
            "Reproduce the paper's comparison on 16 x H100 / Llama-3.3-70B: DistServe (max-goodput placement at\n"
            "the top clock), PlaceOnly (placement ILP every 5-minute window, baseline clocks) and DualScale (the\n"
            "same placements plus per-iteration clock control), on Gamma arrivals at 10-85 % of capacity and on\n"
            "the Azure conv trace at 67 % and 85 % of capacity. Prints a table; --json and --plots write files.\n"
            "Goodput tables and every simulated window are cached in $DUALSCALE_CACHE_DIR (default\n"
            "~/.cache/dualscale; delete it, or pass --no-cache, to recompute): a repeated run only pools the\n"
            "cached windows. Goodput probes and windows run on --workers processes. --quick is a small version\n"
            "for smoke tests.\n\n"
            "examples:\n"
            "  dualscale evaluate --quick\n"
            "  dualscale evaluate --json eval.json --plots eval/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _coarse_options(ev)
    ev.add_argument("--quick", action="store_true", help="coarse grid, short windows: a smoke run")
    ev.add_argument("--no-cache", action="store_true",
                    help="simulate every window again (neither read nor write cached windows)")
    ev.add_argument("--json", type=Path, metavar="PATH", help="write the rows as JSON here")
    ev.add_argument("--plots", type=Path, metavar="DIR", help="write a bar plot of energy per phase here")
    runtime_cli.add_parsers(sub)
    return p


def _coarse_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the coarse-tier commands."""
    p.add_argument("--scenario", default="paper",
                   help="scenario giving profile, SLOs and cluster settings (default: %(default)s)")
    p.add_argument("--workers", type=int, help="processes for the goodput table (default: all CPUs)")


def _cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dualscale.profile import Profile

    prof = Profile.load(args.profile)
    tps = args.tp or list(prof.tp_degrees)
    for tp in tps:
        prof.coefficients("prefill", tp)  # validates tp with a clear message
    clocks = np.array(args.clocks_mhz, dtype=np.float64)
    con = Console()
    con.print(f"[bold]{prof.name}[/bold]: {prof.config.description}")
    con.print(f"supported clocks {prof.clocks_mhz[0]}-{prof.clocks_mhz[-1]} MHz "
              f"(step {prof.config.gpu.clock_step_mhz}), power cap {prof.config.gpu.power_cap_w:.0f} W/GPU")
    for tp in tps:
        pt, pp = prof.prefill(tp, [args.prefill_tokens], clocks)
        ctx = np.full(args.decode_batch, args.decode_context)
        dt, dp = prof.decode(tp, ctx, clocks)
        idle = prof.idle_power_w(clocks)
        t = Table(title=f"TP{tp}: prefill 1x{args.prefill_tokens} tokens, decode batch {args.decode_batch} x "
                        f"{args.decode_context} context; KV capacity {prof.kv_capacity_tokens(tp):,} tokens")
        for col in ("clock MHz", "prefill ms", "prefill W/GPU", "prefill J/token", "decode ms",
                    "decode W/GPU", "decode J/token", "idle W/GPU"):
            t.add_column(col, justify="right")
        for i, f in enumerate(clocks):
            t.add_row(f"{f:.0f}", f"{pt[i] * 1e3:.1f}", f"{pp[i]:.0f}", f"{tp * pp[i] * pt[i] / args.prefill_tokens:.3f}",
                      f"{dt[i] * 1e3:.1f}", f"{dp[i]:.0f}", f"{tp * dp[i] * dt[i] / args.decode_batch:.3f}",
                      f"{idle[i]:.0f}")
        con.print(t)
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from dualscale.profile import fit

    if args.telemetry is not None:
        return _fit_telemetry(args)
    cfg = fit.fit(fit.load_inputs(args.data))
    data = fit.to_toml(cfg)
    if args.out is None:
        sys.stdout.write(data.decode())
    else:
        write_atomic(args.out, data)
        print(f"wrote {args.out} ({len(data)} bytes)", file=sys.stderr)
    return 0


def _cmd_derive(args: argparse.Namespace) -> int:
    from dualscale.profile import Profile, derive

    if args.min_kv_tokens < 1:
        raise ValueError(f"--min-kv-tokens = {args.min_kv_tokens}: must be >= 1")
    base = Profile.load(args.base).config
    geom = derive.read_config(args.config)
    name = args.name or (args.out.stem if args.out is not None else f"{base.name}-derived-{geom.name.split('/')[-1]}")
    cfg = derive.derive(base, derive.base_geometry(base, args.base_config), geom, name=name,
                        min_kv_tokens=args.min_kv_tokens)
    data = derive.to_toml(cfg)
    Profile(cfg)  # everything the profile loader checks, before anything is written
    if args.out is None:
        sys.stdout.write(data.decode())
    else:
        write_atomic(args.out, data)
        tps = ", ".join(f"TP{c.tp}" for c in cfg.latency.prefill)
        print(f"wrote {args.out}: {geom.name} on {base.gpu.name}, {tps}", file=sys.stderr)
    return 0


def _fit_telemetry(args: argparse.Namespace) -> int:
    from dualscale.profile import Profile, telemetry
    from dualscale.profile.fit_telemetry import fit_telemetry, score, to_toml

    tel = telemetry.read(args.telemetry)
    base = Profile.load(args.base).config
    name = args.name or (args.out.stem if args.out is not None else None)
    result = fit_telemetry(tel, base, name=name)
    data = to_toml(result.config)
    if args.out is None:
        sys.stdout.write(data.decode())
    else:
        write_atomic(args.out, data)
        print(f"wrote {args.out}: {result.iterations} iterations, {result.windows} power windows "
              f"from {', '.join(map(str, tel.files))}", file=sys.stderr)
    for note in result.notes:
        print(f"- {note}", file=sys.stderr)
    for s in score(Profile(result.config), tel):
        print(f"fit error on the telemetry itself: {s.phase} {s.quantity}: MAPE {s.mape_pct:.2f} % over {s.n} "
              f"(max {s.max_pct:.1f} %)", file=sys.stderr)
    return 0


def _validate_telemetry(args: argparse.Namespace) -> int:
    from dualscale.profile import Profile, telemetry
    from dualscale.profile.fit_telemetry import score

    tel = telemetry.read(args.telemetry)
    train = telemetry.read(args.fitted_on) if args.fitted_on is not None else None
    scores = score(Profile.load(args.profile), tel, train)
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(
            {"profile": args.profile, "telemetry": str(args.telemetry), "held_out_from": str(args.fitted_on or ""),
             "scores": scores})).decode() + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.profile} on {args.telemetry}" + (f" (held out from {args.fitted_on})" if train else ""))
    for col in ("phase", "quantity", "n", "MAPE %", "median %", "max %"):
        t.add_column(col)
    for s in scores:
        t.add_row(s.phase, s.quantity, str(s.n), f"{s.mape_pct:.2f}", f"{s.median_pct:.2f}", f"{s.max_pct:.1f}")
    Console().print(t)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from dualscale.profile import Profile
    from dualscale.profile.validate import validate

    if args.telemetry is not None:
        return _validate_telemetry(args)
    if args.fitted_on is not None:
        raise ValueError("--fitted-on: only with --telemetry")
    results = validate(Profile.load(args.profile), args.data)
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode({"profile": args.profile, "checks": results})).decode() + "\n")
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"validation of {args.profile}")
        for col in ("check", "dataset", "n", "MAPE %", "median %", "max %", "target %", "met"):
            t.add_column(col)
        for r in results:
            met = "-" if r.met is None else ("yes" if r.met else "[red]NO[/red]")
            t.add_row(r.check, r.dataset, str(r.n), f"{r.mape_pct:.2f}",
                      "-" if r.median_err_pct is None else f"{r.median_err_pct:.2f}", f"{r.max_err_pct:.1f}",
                      "-" if r.target_pct is None else f"{r.target_pct:g}", met)
        Console().print(t)
        for r in results:
            print(f"- {r.check}: {r.note}")
    return 1 if any(r.met is False for r in results) else 0


def _with_truth(scenario: Scenario, args: argparse.Namespace) -> Scenario:
    """``scenario`` with the command line's ground-truth options and ``--no-correction`` applied."""
    t = {k: v for k, v in (("latency_bias_prefill", args.latency_bias), ("latency_bias_decode", args.latency_bias),
                           ("latency_noise", args.latency_noise), ("clock_shape_error", args.clock_shape_error),
                           ("power_bias_prefill", args.power_bias), ("power_bias_decode", args.power_bias),
                           ("power_cap_w", args.power_cap_w), ("switch_jitter", args.switch_jitter)) if v is not None}
    raw = msgspec.to_builtins(scenario)
    raw["truth"] |= t
    if args.no_correction:
        raw["control"]["online_correction"] = False
    # the same checks as the file's, and an error that names the field and the value
    from dualscale.config import convert

    return convert(raw, type(scenario), "command line (ground-truth options)")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dualscale.sim.run import build_trace, rescale, simulate
    from dualscale.sim.scenario import load_scenario

    scenario = _with_truth(load_scenario(args.config if args.config is not None else args.scenario), args)
    changes = {k: v for k, v in (("name", args.trace), ("start_s", args.start), ("duration_s", args.duration),
                                 ("rate_per_s", args.rate), ("scaling", args.scaling), ("cv", args.cv),
                                 ("seed", args.seed)) if v is not None}
    # round-trip through msgspec so command-line values get the same checks as the file's
    spec = msgspec.convert(msgspec.structs.asdict(scenario.trace) | changes, type(scenario.trace))
    trace = build_trace(spec)
    if args.load is not None:
        if not args.load > 0:
            raise ValueError(f"--load = {args.load}: must be > 0 (a fraction of the trace's own rate)")
        trace = rescale(trace, args.load * trace.rate_per_s, spec.scaling)
    policies = args.policy or ["distserve", "dualscale"]
    con = Console(width=None if sys.stdout.isatty() else 160)
    con.print(f"[bold]{scenario.name}[/bold]: {scenario.description}")
    con.print(f"trace {trace.name}: {len(trace):,} requests over {trace.duration_s:,.0f} s "
              f"({len(trace) / max(trace.duration_s, 1e-9):.2f} req/s); SLO P{scenario.slo.percentile:g} TTFT <= {scenario.slo.ttft_s} s, "
              f"TPOT <= {scenario.slo.tpot_s} s")
    results = simulate(scenario, policies, trace, show_progress=not args.quiet)
    summaries = [s for _, s in results]
    base = summaries[0]
    t = Table(title=f"energy and latency per policy (energy change vs {base.policy})")
    for col in ("policy", "prefill kJ", "decode kJ", "total kJ", "vs base P / D", "J/tok P / D",
                "TTFT p50 / p99 s", "TPOT p50 / p99 ms", "attain TTFT / TPOT", "SLO met", "wall s"):
        t.add_column(col, justify="right")
    for s in summaries:
        d_pre = 100 * (s.energy_j.prefill / base.energy_j.prefill - 1)
        d_dec = 100 * (s.energy_j.decode / base.energy_j.decode - 1)
        t.add_row(s.policy, f"{s.energy_j.prefill / 1e3:,.0f}", f"{s.energy_j.decode / 1e3:,.0f}",
                  f"{s.energy_j.total / 1e3:,.0f}", f"{d_pre:+.1f}% / {d_dec:+.1f}%",
                  f"{s.j_per_token.prefill:.3f} / {s.j_per_token.decode:.3f}",
                  f"{s.ttft_s.p50:.3f} / {s.ttft_s.p99:.3f}", f"{s.tpot_s.p50 * 1e3:.1f} / {s.tpot_s.p99 * 1e3:.1f}",
                  f"{s.slo.ttft_attainment:.4f} / {s.slo.tpot_attainment:.4f}",
                  "yes" if s.slo.met else "[red]NO[/red]", f"{s.sim_wall_s:.1f}")
    con.print(t)
    for s in summaries:
        if s.completed < s.requests or s.kv_blocked:
            con.print(f"{s.policy}: {s.requests - s.completed} requests not served "
                      f"({s.rejected} need more KV than a decode instance holds); "
                      f"{s.kv_blocked} waited for decode KV memory")
    if args.json is not None:
        write_atomic(args.json, msgspec.json.format(msgspec.json.encode(summaries)) + b"\n")
        con.print(f"wrote {args.json}")
    if args.plots is not None:
        from dualscale.sim.plots import plot_energy, plot_run

        args.plots.mkdir(parents=True, exist_ok=True)
        written = [p for run, _ in results for p in plot_run(run, args.plots)]
        written.append(plot_energy(summaries, args.plots))
        con.print(f"wrote {len(written)} plots to {args.plots}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dualscale.placement import GoodputSettings, goodput_table, place
    from dualscale.placement.evaluate import EvalSettings
    from dualscale.profile import Profile
    from dualscale.sim.scenario import load_scenario
    from dualscale.sim.traces import load_trace, window

    scenario = load_scenario(args.scenario)
    profile = Profile.load(scenario.profile)
    first = window(load_trace(args.trace), 0.0, args.window)
    rate = args.rate if args.rate is not None else len(first) / args.window
    settings: GoodputSettings = EvalSettings().goodput
    con = Console(stderr=True)
    with con.status(f"goodput table on {first.name} ({len(settings.tp_degrees)} TP x {len(settings.clocks_mhz)} clocks x 2 phases)"):
        table = goodput_table(scenario, first, settings, workers=args.workers)
    plan = place(table, profile, rate, args.gpus, alpha=args.alpha, objective=args.objective, window_s=args.window)
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(plan)).decode() + "\n")
    else:
        t = Table(title=f"placement for {rate:.2f} req/s (+{args.alpha:.0%} headroom) on {args.gpus} GPUs, objective {args.objective}")
        for col in ("phase", "TP", "baseline MHz", "instances", "goodput req/s each", "routed req/s each", "predicted W"):
            t.add_column(col, justify="right")
        for g in plan.groups:
            t.add_row(g.phase, str(g.tp), str(g.freq_mhz), str(g.instances), f"{g.goodput_per_s:.2f}",
                      f"{g.rate_per_s:.2f}", f"{g.power_w:,.0f}")
        Console().print(t)
        print(f"GPUs used {plan.gpus_used} of {plan.gpus}; predicted power {plan.predicted_power_w:,.0f} W, "
              f"energy per {args.window:.0f} s window {plan.predicted_energy_j / 1e6:.2f} MJ")
    if not plan.feasible:
        print(f"dualscale: warning: {plan.message}", file=sys.stderr)
        return 1
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from dualscale.placement.evaluate import QUICK, EvalSettings, evaluate
    from dualscale.sim.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    settings = QUICK if args.quick else EvalSettings()
    con = Console(width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description:<30}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        rows, _, distserve = evaluate(scenario, settings, workers=args.workers, use_cache=not args.no_cache,
                                      progress=progress)
    t = Table(title="DistServe vs PlaceOnly vs DualScale (savings vs DistServe; SLO: P99 TTFT "
                    f"{scenario.slo.ttft_s} s, TPOT {scenario.slo.tpot_s * 1e3:.0f} ms)")
    for col in ("workload", "load", "req/s", "policy", "prefill kJ", "decode kJ", "J/tok P / D", "saving P / D",
                "P99 TTFT s", "P99 TPOT ms", "SLO met", "GPUs"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r.workload, f"{r.load:.0%}", f"{r.rate_per_s:.2f}", r.policy, f"{r.energy_j['prefill'] / 1e3:,.0f}",
                  f"{r.energy_j['decode'] / 1e3:,.0f}", f"{r.j_per_token['prefill']:.3f} / {r.j_per_token['decode']:.3f}",
                  f"{r.saving_vs_distserve['prefill']:+.1%} / {r.saving_vs_distserve['decode']:+.1%}",
                  f"{r.ttft_p99_s:.3f}", f"{r.tpot_p99_s * 1e3:.1f}", "yes" if r.slo_met else "[red]NO[/red]",
                  f"{r.gpus_mean:.1f}")
    con.print(t)
    con.print("DistServe placement: " + ", ".join(f"{g.instances} x {g.phase} TP{g.tp}" for g in distserve.groups))
    if args.json is not None:
        write_atomic(args.json, msgspec.json.format(msgspec.json.encode(rows)) + b"\n")
        con.print(f"wrote {args.json}")
    if args.plots is not None:
        from dualscale.sim.plots import plot_evaluation

        args.plots.mkdir(parents=True, exist_ok=True)
        con.print(f"wrote {plot_evaluation(rows, args.plots)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {("profile", "show"): _cmd_show, ("profile", "fit"): _cmd_fit, ("profile", "derive"): _cmd_derive,
                ("profile", "validate"): _cmd_validate, ("profile", "sweep"): runtime_cli.cmd_sweep,
                ("simulate", None): _cmd_simulate, ("plan", None): _cmd_plan, ("evaluate", None): _cmd_evaluate,
                **runtime_cli.HANDLERS}
    try:
        return handlers[(args.command, getattr(args, "action", None))](args)
    except (DualscaleError, ValueError) as e:
        print(f"dualscale: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
