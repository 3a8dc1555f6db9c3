"""Prometheus metrics of the controller daemon, in a registry of its own (no global state).

prometheus_client is used rather than a hand-written exposition: it is small, pure Python, has no
dependencies, and gets the text format, histogram buckets and HTTP serving right. The hot path only
touches pre-bound children (``labels()`` is looked up once per instance).
"""

from __future__ import annotations

import errno
import socket
import threading
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, start_http_server
from prometheus_client.exposition import ThreadingWSGIServer

from dualscale.errors import ConfigError
from dualscale.runtime.serial import REASONS
from dualscale.runtime.transport import in_use_hint

#: Decision latency buckets (s): 20 us .. 50 ms.
LATENCY_BUCKETS_S = (2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)


class DaemonMetrics:
    """Every metric the daemon exports (names carry units: ``_seconds``, ``_mhz``, ``_watts``, ``_joules``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter("dualscale_decisions", "Clock decisions made", ["instance", "phase"], registry=r)
        self.decision_latency = Histogram(
            "dualscale_decision_latency_seconds", "Report received to clock command sent, in the daemon",
            ["phase"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.infeasible = Counter("dualscale_infeasible_decisions", "Decisions where no clock met every deadline",
                                  ["instance"], registry=r)
        self.clock = Gauge("dualscale_clock_mhz", "Clock last commanded per instance", ["instance"], registry=r)
        self.dropped = Counter("dualscale_dropped_messages", "Messages dropped by reason", ["reason"], registry=r)
        self.superseded = Counter("dualscale_superseded_reports",
                                  "Reports replaced by a newer one of the same instance before a decision", registry=r)
        self.unroutable = Counter("dualscale_unroutable_commands",
                                  "Commands not sent: actuator not connected or its queue full", ["node"], registry=r)
        self.gpu_clock = Gauge("dualscale_gpu_clock_mhz", "SM clock reached, read back by the actuator",
                               ["node", "gpu"], registry=r)
        self.gpu_locked = Gauge("dualscale_gpu_locked_clock_mhz", "SM clock locked by the actuator (0 = not locked)",
                                ["node", "gpu"], registry=r)
        self.gpu_reasons = Gauge("dualscale_gpu_clock_event_reasons", "NVML clock-event (throttle) reasons bitmask",
                                 ["node", "gpu"], registry=r)
        self.power = Gauge("dualscale_power_watts", "Power of the GPUs of each phase", ["phase"], registry=r)
        self.energy = Counter("dualscale_energy_joules", "Energy of the GPUs of each phase", ["phase"], registry=r)
        self.actuator_up = Gauge("dualscale_actuator_up", "1 while the node's actuator reports", ["node"], registry=r)
        self.deadman_resets = Gauge("dualscale_actuator_deadman_resets", "Dead-man resets the actuator reported",
                                    ["node"], registry=r)
        self.correction = Gauge("dualscale_latency_correction_ratio",
                                "Factor on the profile's iteration time the controller plans with (online correction)",
                                ["instance"], registry=r)
        self.prediction_error = Gauge(
            "dualscale_prediction_error_ratio",
            "Last measured iteration time / predicted - 1: by the profile alone (basis=model) and as corrected "
            "(basis=corrected)", ["instance", "basis"], registry=r)
        self.feedback = Counter("dualscale_feedback_iterations", "Measured iterations the controller learnt from",
                                ["instance"], registry=r)
        self.safety = Counter("dualscale_safety_fallbacks",
                              "Times a measured iteration exceeded the corrected prediction: top clock for a while",
                              ["instance"], registry=r)
        self.conflicts = Counter("dualscale_actuator_conflicts",
                                 "Statuses refused: a second actuator connection claimed a node whose actuator reports",
                                 ["node"], registry=r)
        self.auth_denied = Gauge("dualscale_auth_denied", "Connections refused by CURVE authentication, per socket",
                                 ["socket"], registry=r)
        # shadow accounting (meaningful above all with `actuator --observe`, when clocks are not applied)
        self.shadow_energy = Counter(
            "dualscale_predicted_energy_joules",
            "Predicted energy of each iteration decided on: at the decided clock (plan=decided) and at the "
            "top clock (plan=top)", ["instance", "plan"], registry=r)
        self.instance_energy = Counter("dualscale_instance_energy_joules",
                                       "Energy measured on each instance's GPUs (actuator counters)", ["instance"],
                                       registry=r)
        self.predicted_misses = Counter(
            "dualscale_predicted_misses",
            "Iterations whose measured/predicted time ratio, applied to the decided clock's predicted time, "
            "exceeds its deadline budget: how often the plan would have missed (shadow mode) or did",
            ["instance"], registry=r)
        for reason in REASONS:
            self.dropped.labels(reason)  # every reason is exported from the start, at 0


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape is not an event


def serve_metrics(metrics: DaemonMetrics, host: str, port: int, fd: int | None = None) -> WSGIServer:
    """Serve ``/metrics`` over HTTP on a daemon thread; ``shutdown()`` the returned server to stop.

    ``fd``: a listening socket already bound to host:port (socket activation, see
    :class:`dualscale.runtime.transport.Listeners`), served instead of binding; the server owns it.

    Raises:
        ConfigError: host:port cannot be bound (the message names the port's holder).
    """
    if fd is None:
        try:
            server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as e:
            hint = in_use_hint(f"tcp://{host}:{port}") if e.errno == errno.EADDRINUSE else ""
            raise ConfigError(f"metrics on {host}:{port}: cannot bind: {e.strerror or e}{hint}") from e
        return server
    sock = socket.socket(fileno=fd)
    server = ThreadingWSGIServer(sock.getsockname()[:2], _Quiet, bind_and_activate=False)
    server.socket.close()
    # what HTTPServer.server_bind would have set, for a socket that is bound and listening already
    server.socket, server.server_address = sock, sock.getsockname()
    server.server_name, server.server_port = sock.getsockname()[0], sock.getsockname()[1]
    server.setup_environ()
    server.set_app(make_wsgi_app(metrics.registry))
    threading.Thread(target=server.serve_forever, name="dualscale-metrics", daemon=True).start()
    return server


def read_metrics(host: str, port: int, timeout_s: float = 5.0) -> dict[str, float]:
    """Every sample of a ``/metrics`` page, keyed as exposed (``name{label="v",...}``).

    Raises:
        OSError: the endpoint did not answer.
    """
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
