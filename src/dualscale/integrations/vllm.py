"""vLLM v1 scheduler classes that report every step to the dualscale controller.

Enable with one flag on each vLLM server, plus where to report (environment or config, see
:mod:`dualscale.integrations.settings`)::

    DUALSCALE_CONTROLLER=tcp://10.0.0.1:5600 DUALSCALE_INSTANCE=decode-0 \\
        vllm serve MODEL --scheduler-cls dualscale.integrations.vllm.DualscaleAsyncScheduler ...

``DualscaleAsyncScheduler`` when async scheduling is on (vLLM's default), ``DualscaleScheduler`` with
``--no-async-scheduling``. The phase comes from ``kv_transfer_config.kv_role`` (``kv_producer`` =
prefill, ``kv_consumer`` = decode; ``kv_both`` or none needs ``DUALSCALE_PHASE``). With data
parallelism (size > 1) each rank reports as ``<instance>-dp<rank>``.

What a step reports (right after ``schedule()``, before the step runs: the controller's clock reaches
the GPU within a millisecond, so it applies to the step about to run):

- prefill: every request whose prompt is not yet fully computed (running chunks first, then the
  waiting queues), in arrival order (the controller's FCFS model; vLLM's own order differs only after
  a preemption or under priority scheduling), with its arrival time (vLLM's wall-clock
  ``arrival_time``), prompt length and the tokens computed before this step; listed in vLLM's order
  only until the prompt tokens left reach ``queue_batches`` (default 24) batches of
  ``max_num_batched_tokens``: a controller planning at most that many batches ahead decides the same
  without the rest (when vLLM's order is not the arrival order and the queue is cut, the report holds
  what vLLM serves first, not the earliest arrivals);
- decode: every running request that has emitted its first token, with that time (recorded when
  ``update_from_output`` first sees an output token: vLLM keeps no such time), its output tokens so
  far and its context (computed tokens including this step's);
- both: KV-cache use, and the measured time of the last completed step (its end minus the later of
  its ``schedule()`` and the previous step's end). The clock in use is not known to the scheduler
  (0 = unknown; the actuator reads it back).

A report costs list comprehensions in Python over the requests it lists (three reads per running
request for decode, three per listed request for prefill), no NumPy; no reference to a request is kept
past the step but to those awaiting a first token (a finished request is then freed in vLLM's own
code). The report is copied into shared memory by
:class:`dualscale.runtime.WorkerAgent` (no system call, no wait). Nothing here raises into the
engine: a failure is logged once, reporting stops, the engine goes on; without a controller, reports
are dropped and counted (``scheduler.dualscale.agent``).

vLLM's scheduler is not a public interface: the supported releases are pinned (``settings.SUPPORTED``,
the ``dualscale[vllm]`` extra) and checked when this module is imported.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections import deque
from itertools import chain
from typing import Any

import numpy as np

from dualscale.integrations.settings import SUPPORTED, Phase, check_version, load_settings, resolve_phase

try:
    import vllm
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("dualscale.integrations.vllm needs vLLM (>={},<{}): ".format(*SUPPORTED["vllm"]) +
                      f"pip install 'dualscale[vllm]' ({e})") from e

check_version("vllm", vllm.__version__)

log = logging.getLogger("dualscale.integrations.vllm")

#: kv_transfer_config.kv_role -> phase (kv_both and no connector are ambiguous)
KV_ROLE_PHASE: dict[str | None, Phase] = {"kv_producer": "prefill", "kv_consumer": "decode"}

_NAN = float("nan")
#: Attribute a decode scheduler sets on each vLLM ``Request``: wall-clock time of its first token,
#: ``_NAN`` (that very object) until then. On the request, not in a dict by id: a report reads it as
#: cheaply as vLLM's own fields, and it goes when the request does.
FIRST_TOKEN_ATTR = "dualscale_first_token_s"
#: No queue limit (``queue_batches = 0``).
_WHOLE_QUEUE = 1 << 62


class Reporting:
    """One scheduler's reporting state: its agent, the first-token bookkeeping and the step timing.

    Attributes:
        agent: the :class:`~dualscale.runtime.WorkerAgent` (its counters say what was sent/dropped).
        instance, phase: what the reports are sent as.
        queue_tokens: prefill: prompt tokens left after which the queue is not listed further.
        awaiting: decode: added requests without a first token yet, by request id.
        iteration_s: measured time of the last completed step (s); 0 before the first.
        failed: the exception that stopped reporting, if any.
    """

    def __init__(self, agent: Any, instance: str, phase: Phase, queue_tokens: int = _WHOLE_QUEUE) -> None:
        self.agent = agent
        self.instance = instance
        self.phase = phase
        self.queue_tokens = queue_tokens
        self.awaiting: dict[str, Any] = {}
        self.iteration_s = 0.0
        self.failed: BaseException | None = None
        self._scheduled_at: deque[float] = deque(maxlen=64)  # perf_counter at each schedule(), FIFO
        self._last_end = 0.0


def _make_reporting(sched: Scheduler) -> Reporting | None:
    """The scheduler's reporting state from its config and the environment; None when not configured
    or when it cannot start (logged; the engine goes on without dualscale)."""
    try:
        vc = sched.vllm_config
        extra = vc.additional_config.get("dualscale") if isinstance(vc.additional_config, dict) else None
        settings = load_settings(extra, "--additional-config dualscale")
        if not settings.enabled:
            log.warning("dualscale scheduler without a controller: set DUALSCALE_CONTROLLER and "
                        "DUALSCALE_INSTANCE (or --additional-config '{\"dualscale\": {...}}'); reporting is off")
            return None
        ktc = vc.kv_transfer_config
        role = ktc.kv_role if ktc is not None else None
        phase = resolve_phase(settings.phase, KV_ROLE_PHASE.get(role),
                              f"kv_transfer_config.kv_role = {role!r}")
        pc = vc.parallel_config
        instance = settings.instance
        if pc.data_parallel_size > 1:
            instance = f"{instance}-dp{pc.data_parallel_rank}"
        if vc.scheduler_config.async_scheduling and not isinstance(sched, AsyncScheduler):
            log.warning("dualscale: async scheduling is on but %s is the synchronous scheduler; use "
                        "--scheduler-cls dualscale.integrations.vllm.DualscaleAsyncScheduler", type(sched).__name__)
        from dualscale.runtime.worker import WorkerAgent

        queue_tokens = settings.queue_batches * vc.scheduler_config.max_num_batched_tokens or _WHOLE_QUEUE
        agent = WorkerAgent(settings.controller, instance, phase, keys_dir=settings.keys_dir or None)
    except Exception as e:  # never raise into the engine
        log.error("dualscale: reporting is off: %s: %s", type(e).__name__, e)
        return None
    log.info("dualscale: reporting %s steps as %r to %s", phase, instance, settings.controller)
    return Reporting(agent, instance, phase, queue_tokens)


class _ReportingMixin:
    """Wraps ``add_request``, ``schedule``, ``update_from_output`` and ``shutdown`` of a vLLM scheduler."""

    dualscale: Reporting | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.dualscale = _make_reporting(self)  # type: ignore[arg-type]

    def add_request(self, request: Any) -> None:
        super().add_request(request)  # type: ignore[misc]
        ds = self.dualscale
        if ds is not None and ds.phase == "decode":
            try:
                # a new request (not the next input of a streaming session, which vLLM does not keep)
                if self.requests.get(request.request_id) is request:  # type: ignore[attr-defined]
                    setattr(request, FIRST_TOKEN_ATTR, _NAN)
                    ds.awaiting[request.request_id] = request
            except Exception as e:
                self._dualscale_failed(ds, e)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        out = super().schedule(*args, **kwargs)  # type: ignore[misc]
        ds = self.dualscale
        if ds is not None:
            try:
                ds._scheduled_at.append(time.perf_counter())
                if ds.phase == "prefill":
                    self._report_prefill(ds, out.num_scheduled_tokens)
                else:
                    self._report_decode(ds)
            except Exception as e:
                self._dualscale_failed(ds, e)
        return out

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]
        ds = self.dualscale
        if ds is not None:
            try:
                self._after_step(ds, scheduler_output)
            except Exception as e:
                self._dualscale_failed(ds, e)
        return outputs

    def shutdown(self) -> None:
        ds = self.dualscale
        if ds is not None:
            self.dualscale = None
            try:
                ds.agent.close()
            except Exception as e:
                log.error("dualscale: closing the worker agent: %s: %s", type(e).__name__, e)
        super().shutdown()  # type: ignore[misc]

    # ---- reporting -----------------------------------------------------------------------------
    # Both reports read vLLM's requests with list comprehensions and plain loops into array.array:
    # from N Python objects to a buffer that is the cheapest way (NumPy calls cost microseconds each
    # here, where the engine's step has pushed this code out of the CPU caches); the agent sends the
    # arrays' buffers as they are.
    def _report_prefill(self, ds: Reporting, scheduled: dict[str, int]) -> None:
        arrival, prompt, prefilled = array("d"), array("q"), array("q")
        put_a, put_p, put_d = arrival.append, prompt.append, prefilled.append
        left = ds.queue_tokens  # listed until the prompt tokens left reach this: a bounded cost
        latest = -math.inf
        ordered = True
        get = scheduled.get
        # (request, tokens computed before this step): running chunks still in prefill before this
        # step's chunk, then the waiting queues, as vLLM serves them
        queue = chain(((r, d) for r in self.running  # type: ignore[attr-defined]
                       if (d := r.num_computed_tokens - get(r.request_id, 0)) < r.num_prompt_tokens),
                      ((r, r.num_computed_tokens) for q in (self.kv_holding_waiting, self.waiting)  # type: ignore[attr-defined]
                       for r in q))
        for r, d in queue:
            a, p = r.arrival_time, r.num_prompt_tokens
            put_a(a)
            put_p(p)
            put_d(d)
            ordered = ordered and a >= latest
            latest = a
            left -= p - d
            if left <= 0:
                break
        if not ordered:  # after a preemption, or priority scheduling: the controller's FCFS order
            order = np.argsort(np.frombuffer(arrival), kind="stable")
            arrival, prompt, prefilled = (np.frombuffer(x, x.typecode)[order] for x in (arrival, prompt, prefilled))
        ds.agent.report_prefill(time.time(), arrival, prompt, prefilled, kv_util=self._kv_util(),
                                iteration_s=ds.iteration_s)

    def _report_decode(self, ds: Reporting) -> None:
        started = self.running  # type: ignore[attr-defined]
        # FIRST_TOKEN_ATTR, read as an attribute: getattr() costs twice as much per request. Read every
        # step rather than kept per batch: a kept batch would hold the last reference to finished
        # requests, and freeing them (their token lists) would then fall in this hook.
        first = [r.dualscale_first_token_s for r in started]
        if ds.awaiting:
            # requests still waiting for their first token are not the decode controller's yet; they all
            # hold the very object _NAN, which ``is`` and list.count find (NaN != NaN)
            n = j = len(first)
            while j and first[j - 1] is _NAN:
                j -= 1
            # usually those waiting are the latest to join the batch; awaiting also holds requests not
            # running yet (a running one without a first token is always there)
            if n - j == len(ds.awaiting) or n - j == first.count(_NAN):
                if j < n:
                    started, first = started[:j], first[:j]
            else:
                started = [r for r, t in zip(started, first) if t is not _NAN]
                first = [t for t in first if t is not _NAN]
        # the private list behind Request.num_output_tokens: the property call costs about twice the
        # read per request (vLLM's release is pinned, and the tests compare with the property)
        tokens_out = array("q", [len(r._output_token_ids) for r in started])
        context = array("q", [r.num_computed_tokens for r in started])
        ds.agent.report_decode(time.time(), array("d", first), tokens_out, context,
                               kv_util=float(self.kv_cache_manager.usage),  # type: ignore[attr-defined]
                               iteration_s=ds.iteration_s)

    def _kv_util(self) -> float:
        return float(self.kv_cache_manager.usage)  # type: ignore[attr-defined]

    def _after_step(self, ds: Reporting, scheduler_output: Any) -> None:
        end = time.perf_counter()
        start = ds._scheduled_at.popleft() if ds._scheduled_at else end
        if scheduler_output.total_num_scheduled_tokens > 0:
            ds.iteration_s = end - max(start, ds._last_end)
            ds._last_end = end
        if ds.phase == "decode":
            awaiting = ds.awaiting
            if awaiting:
                now = time.time()
                scheduled = scheduler_output.num_scheduled_tokens
                small, big = (awaiting, scheduled) if len(awaiting) <= len(scheduled) else (scheduled, awaiting)
                for rid in [r for r in small if r in big]:
                    req = awaiting[rid]
                    if req.num_output_tokens > 0:
                        setattr(req, FIRST_TOKEN_ATTR, now)
                        del awaiting[rid]
                for rid in scheduler_output.finished_req_ids:  # finished or aborted since the last schedule()
                    awaiting.pop(rid, None)

    def _dualscale_failed(self, ds: Reporting, e: BaseException) -> None:
        ds.failed = e
        self.dualscale = None
        log.error("dualscale: reporting stopped after an unexpected error (the engine goes on)", exc_info=e)
        try:
            ds.agent.close()
        except Exception:
            pass


class DualscaleScheduler(_ReportingMixin, Scheduler):
    """vLLM's synchronous scheduler, reporting every step to dualscale (``--no-async-scheduling``)."""


class DualscaleAsyncScheduler(_ReportingMixin, AsyncScheduler):
    """vLLM's async scheduler (the default mode), reporting every step to dualscale."""
