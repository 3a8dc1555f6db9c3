"""``dualscale serve`` and ``dualscale actuator``: argparse wiring and handlers of the runtime roles."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import msgspec

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_parsers(sub: Any) -> None:
    """Add the ``serve``, ``actuator`` and ``keys`` subcommands to the ``dualscale`` subparsers ``sub``."""
    serve = sub.add_parser(
        "serve", help="run the controller daemon: worker reports in, clock commands out",
        description=(
            "Run the fine-tier controllers for every instance of a runtime config: receive the workers'\n"
            "per-iteration reports (ZeroMQ PULL), decide each instance's next SM clock, send it to the\n"
            "node's actuator (ROUTER), heartbeat the actuators, publish the placement, export Prometheus\n"
            "metrics. Runs unprivileged. Stops on SIGTERM/SIGINT.\n\n"
            "--record FILE writes telemetry while it runs (JSON Lines, see dualscale/profile/telemetry.py):\n"
            "every iteration whose clock is known (batch shape, measured time, clock read back) and power\n"
            "windows at a fixed clock from the actuators' energy counters, rotated at --record-max-mb;\n"
            "refit a profile from it with `dualscale profile fit --telemetry FILE`.\n\n"
            "examples:\n"
            "  dualscale serve --config configs/runtime/example.toml --metrics-port 9400\n"
            "  dualscale serve --config deploy.toml --record /var/lib/dualscale/telemetry.jsonl"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", default="example", help="runtime config name or TOML path (default: %(default)s)")
    serve.add_argument("--metrics-port", type=int, help="serve /metrics on this port (0 = off; default: the config's)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    serve.add_argument("--record", metavar="FILE", help="write telemetry to FILE (appended; rotated to FILE.1 ...)")
    serve.add_argument("--record-window-s", type=float, default=1.0,
                       help="power window length, s (default: %(default)s; NVML power is a ~100 ms average)")
    serve.add_argument("--record-max-mb", type=float, default=256.0,
                       help="rotate the telemetry file at this size, MB; 3 rotated files are kept (default: %(default)s)")

    act = sub.add_parser(
        "actuator", help="run a node's clock actuator (the only privileged role)",
        description=(
            "Apply the controller's clock commands to the GPUs of this node: lock SM clocks (all GPUs of an\n"
            "instance in parallel), skip no-op writes, round up to supported clocks, read back the clock\n"
            "reached, throttle reasons, power and energy, and report them. Resets every managed GPU at start,\n"
            "on exit and on SIGTERM/SIGINT, and when the controller is silent for --deadman-s.\n"
            "--backend nvml needs root (CAP_SYS_ADMIN); --backend sim simulates the node.\n"
            "Refuses to start when its config, policy, key or library file could be written by a user other\n"
            "than root (or the user it runs as) or is a symlink; takes commands only from the controller's\n"
            "key and only for the instances, GPUs and clocks of the node policy. Exits non-zero when a GPU\n"
            "could not be reset. One actuator per node: it first takes an exclusive lock on --lock-file\n"
            "(default /run/dualscale/actuator.lock for nvml, STATE_FILE.lock for sim; none with --observe)\n"
            "and, when another actuator holds it, exits with status 75 naming it, touching no GPU.\n\n"
            "examples:\n"
            "  systemctl start dualscale-actuator   # the deployment path: see the README's Deployment section\n"
            "  /opt/dualscale/bin/dualscale actuator --config /etc/dualscale/runtime.toml --backend nvml --node gpu-node-3\n"
            "  dualscale actuator --config example --backend sim --state-file node0.state\n"
            "  dualscale actuator --config deploy.toml --backend nvml --observe   # shadow mode, first"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    act.add_argument("--config", default="example", help="runtime config name or TOML path (default: %(default)s)")
    act.add_argument("--backend", choices=("nvml", "sim"), help="GPU backend (default: the config's)")
    act.add_argument("--node", help="this node's name, as the config's instances name it")
    act.add_argument("--controller", help="the daemon's actuator address, e.g. tcp://10.0.0.1:5601")
    act.add_argument("--deadman-s", type=float, help="reset clocks after this long without the controller, s")
    act.add_argument("--status-period-s", type=float, help="report clocks, power and energy this often, s")
    act.add_argument("--gpus", type=int, nargs="+", help="GPU indices to manage (default: all)")
    act.add_argument("--nvml-library", help="NVML library to load instead of the driver's libnvidia-ml.so.1")
    act.add_argument("--sim-gpus", type=int, help="sim backend: GPUs of the simulated node")
    act.add_argument("--state-file", help="sim backend: share the simulated node through this file")
    act.add_argument("--lock-file", help="the node's actuator lock (default: /run/dualscale/actuator.lock for "
                                         "nvml, the sim state file + .lock for sim)")
    act.add_argument("--policy", help="node policy file (instances, GPUs, clock bounds; default: the config's)")
    act.add_argument("--observe", action="store_true",
                     help="shadow mode: read and report clocks, power and energy, never lock or reset a clock "
                          "(no privilege needed); the controller exports what it would have done")
    act.add_argument("--log-level", choices=LOG_LEVELS, default="info")

    keys = sub.add_parser(
        "keys", help="make the CURVE key pairs of a deployment's roles",
        description=(
            "Write one CURVE key pair per role of a runtime config into a directory (created mode 0700):\n"
            "controller, actuator-<node> per node, engine-<instance> per instance. NAME.key holds the public\n"
            "key (0644), NAME.key_secret the pair (0600); files are written atomically and never through a\n"
            "symlink, and existing pairs are kept unless --force. Give each host its own role's .key_secret\n"
            "and the public keys it checks (every host: controller.key; the controller: all of them).\n\n"
            "examples:\n"
            "  dualscale keys --config deploy.toml --out /etc/dualscale/keys\n"
            "  dualscale keys --out ./keys --name engine-decode-7"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys.add_argument("--config", default="example", help="runtime config whose roles get keys (default: %(default)s)")
    keys.add_argument("--out", required=True, help="key directory (the config's [security] keys_dir on the hosts)")
    keys.add_argument("--name", nargs="+", help="make only these key pairs (e.g. controller, actuator-node0)")
    keys.add_argument("--force", action="store_true", help="replace existing key pairs")


def _on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: object) -> None:
        stop()  # only flips the loop's state; the loop resets and exits

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _no_new_privileges() -> None:
    """Linux ``PR_SET_NO_NEW_PRIVS``: nothing this process runs can gain privileges (setuid files,
    file capabilities). Best effort: the systemd unit sets it too (``NoNewPrivileges=yes``)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS = 38
    except (OSError, AttributeError):
        pass


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    from dualscale.runtime.config import load_runtime_config
    from dualscale.runtime.daemon import ControllerDaemon

    _logging(args.log_level)
    cfg = load_runtime_config(args.config)
    if args.metrics_port is not None:
        cs = msgspec.convert(msgspec.structs.asdict(cfg.controller) | {"metrics_port": args.metrics_port},
                             type(cfg.controller))
        cfg = msgspec.structs.replace(cfg, controller=cs)
    recorder = None
    if args.record:
        from dualscale.runtime.recorder import TelemetryRecorder

        recorder = TelemetryRecorder(args.record, list(cfg.instances), cfg.profile, window_s=args.record_window_s,
                                     max_bytes=int(args.record_max_mb * 2**20))
    try:
        daemon = ControllerDaemon(cfg, recorder=recorder)
        _on_signals(daemon.stop)
        daemon.run()
    finally:
        if recorder is not None:
            recorder.close()
            logging.getLogger("dualscale.runtime.daemon").info(
                "recorded %d iterations and %d power windows to %s", recorder.iterations, recorder.windows, args.record)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``dualscale profile sweep`` (its options are in dualscale.cli)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from dualscale.profile import Profile
    from dualscale.runtime.config import load_runtime_config
    from dualscale.runtime.loadgen import LoadGenerator
    from dualscale.runtime.recorder import TelemetryRecorder
    from dualscale.runtime.sweep import SweepDaemon, grid_mhz, load_state

    _logging("warning" if not args.quiet else "error")
    cfg = load_runtime_config(args.config)
    profile = Profile.load(cfg.profile)
    clocks = args.clocks_mhz or grid_mhz(profile, args.steps)
    bad = [f for f in clocks if f not in set(profile.clocks_mhz.tolist())]
    if bad:
        raise ValueError(f"--clocks-mhz: {bad[0]} is not a supported clock of {profile.name!r} "
                         f"({profile.clocks_mhz[0]}..{profile.clocks_mhz[-1]} MHz in steps of "
                         f"{profile.config.gpu.clock_step_mhz})")
    if not args.dwell_s > 0:
        raise ValueError(f"--dwell-s = {args.dwell_s}: must be > 0")
    state = load_state(args.out, clocks, args.dwell_s, args.resume)
    load = LoadGenerator(args.load_url, args.load_model, args.load_rate) if args.load_url else None
    recorder = TelemetryRecorder(str(args.out), list(cfg.instances), cfg.profile, window_s=args.window_s,
                                 source="sweep")
    total_s = len([f for f in state.clocks_mhz if f not in state.done_mhz]) * args.dwell_s
    with Progress(TextColumn("sweep {task.fields[clock]}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), disable=args.quiet, transient=True) as bar:
        task = bar.add_task("sweep", total=total_s, clock="", info="")

        def progress(freq_mhz: int | None, left_s: float) -> None:
            bar.update(task, completed=total_s - left_s, clock=f"{freq_mhz} MHz" if freq_mhz else "done",
                       info=f"{recorder.iterations} iterations, {recorder.windows} power windows")

        daemon = None
        try:
            daemon = SweepDaemon(cfg, state, args.out, recorder, progress=progress)
            _on_signals(daemon.stop)
            if load is not None:
                load.start()
            daemon.run()
        finally:
            if load is not None:
                load.stop()
            recorder.close()
            if not args.resume and not state.done_mhz and recorder.iterations == 0:
                args.out.unlink(missing_ok=True)  # nothing recorded: no file for --resume to trip on
    done = daemon is not None and daemon.finished
    print(f"{'sweep done' if done else 'sweep interrupted'}: {len(state.done_mhz)} of {len(state.clocks_mhz)} clocks, "
          f"{recorder.iterations} iterations and {recorder.windows} power windows in {args.out}"
          + ("" if done else "; continue with --resume")
          + (f"; load: {load.stats.ok} ok, {load.stats.failed} failed" if load is not None else ""))
    return 0 if done else 1


def cmd_keys(args: argparse.Namespace) -> int:
    from dualscale.runtime.config import load_runtime_config
    from dualscale.runtime.keys import role_names, write_keypair

    names = args.name
    if not names:
        cfg = load_runtime_config(args.config)
        names = role_names({i.node for i in cfg.instances}, [i.name for i in cfg.instances])
    for n in names:
        try:
            public, secret = write_keypair(args.out, n, force=args.force)
        except FileExistsError as e:
            print(f"dualscale keys: {e}", file=sys.stderr)
            return 1
        print(f"{n}: {public} (public), {secret} (secret, 0600)")
    return 0


def cmd_actuator(args: argparse.Namespace) -> int:
    from dualscale.device import make_backend
    from dualscale.runtime.actuator import EXIT_NODE_LOCKED, Actuator, NodeLocked, lock_node
    from dualscale.runtime.config import (
        ActuatorSettings,
        NodePolicy,
        SimSettings,
        load_policy,
        load_trusted_runtime_config,
    )
    from dualscale.runtime.keys import Security, actuator_name

    _no_new_privileges()
    _logging(args.log_level)
    cfg = load_trusted_runtime_config(args.config)
    a = cfg.actuator
    over = {k: v for k, v in (("backend", args.backend), ("node", args.node), ("controller_address", args.controller),
                              ("deadman_s", args.deadman_s), ("status_period_s", args.status_period_s),
                              ("gpus", args.gpus), ("nvml_library", args.nvml_library),
                              ("policy_file", args.policy), ("observe", args.observe or None),
                              ("lock_file", args.lock_file)) if v is not None}
    sim_over = {k: v for k, v in (("gpus", args.sim_gpus), ("state_file", args.state_file)) if v is not None}
    sim = msgspec.convert(msgspec.structs.asdict(a.sim) | sim_over, SimSettings)
    # round-trip through msgspec so command-line values get the same checks as the file's
    a = msgspec.convert(msgspec.structs.asdict(a) | over | {"sim": msgspec.structs.asdict(sim)}, ActuatorSettings)
    # one actuator per node, before any GPU is touched: a second one must not reset the first one's locks
    lock = a.lock_path()
    try:
        lock_fd = lock_node(lock, a.node) if lock else -1
    except NodeLocked as e:
        print(f"dualscale: error: {e}", file=sys.stderr)
        return EXIT_NODE_LOCKED
    try:
        backend = make_backend(a.backend, profile=cfg.profile, gpus=a.sim.gpus, switch_delay_s=a.sim.switch_delay_s,
                               state_file=a.sim.state_file or None, nvml_library=a.nvml_library or None)
        policy = load_policy(a.policy_file) if a.policy_file else NodePolicy.of_node(cfg, a.node)
        with backend:
            actuator = Actuator(backend, a, policy)
            _on_signals(actuator.stop)
            actuator.start()  # resets every GPU first: a previous actuator may have died with them locked
            try:
                actuator.security = Security(cfg.security.mechanism, cfg.security.keys_dir, actuator_name(a.node))
            except BaseException:
                actuator.close()
                raise
            actuator.run()
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)  # only now: every GPU this actuator locked has been reset
    return actuator.exit_code


HANDLERS: dict[tuple[str, None], Callable[[argparse.Namespace], int]] = {
    ("serve", None): cmd_serve,
    ("actuator", None): cmd_actuator,
    ("keys", None): cmd_keys,
}
