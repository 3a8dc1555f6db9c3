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
  ``arrival_time``), prompt length and the tokens computed before this step;
- decode: every running request that has emitted its first token, with that time (recorded when
  ``update_from_output`` first sees an output token: vLLM keeps no such time), its output tokens so
  far and its context (computed tokens including this step's);
- both: KV-cache use, and the measured time of the last completed step (its end minus the later of
  its ``schedule()`` and the previous step's end). The clock in use is not known to the scheduler
  (0 = unknown; the actuator reads it back).

The report is copied into shared memory by :class:`dualscale.runtime.WorkerAgent` (no system call,
no wait). Nothing here raises into the engine: a failure is logged once, reporting stops, the engine
goes on; without a controller, reports are dropped and counted (``scheduler.dualscale.agent``).

vLLM's scheduler is not a public interface: the supported releases are pinned (``settings.SUPPORTED``,
the ``dualscale[vllm]`` extra) and checked when this module is imported.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import deque
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
class Reporting:
    """One scheduler's reporting state: its agent, the first-token times and the step timing.

    Attributes:
        agent: the :class:`~dualscale.runtime.WorkerAgent` (its counters say what was sent/dropped).
        instance, phase: what the reports are sent as.
        first_token_s: decode: wall-clock time of each running request's first token, by request id.
        iteration_s: measured time of the last completed step (s); 0 before the first.
        failed: the exception that stopped reporting, if any.
    """

    def __init__(self, agent: Any, instance: str, phase: Phase) -> None:
        self.agent = agent
        self.instance = instance
        self.phase = phase
        self.first_token_s: dict[str, float] = {}
        self.awaiting: dict[str, Any] = {}  # decode: added requests without a first token yet
        self.iteration_s = 0.0
        self.failed: BaseException | None = None
        self.first_changed = False  # a first token was recorded since the last decode report
        self._batch: list[Any] = []  # the running requests of the last decode report, in order
        self._first = np.empty(0)  # their first-token times
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

        agent = WorkerAgent(settings.controller, instance, phase, keys_dir=settings.keys_dir or None)
    except Exception as e:  # never raise into the engine
        log.error("dualscale: reporting is off: %s: %s", type(e).__name__, e)
        return None
    log.info("dualscale: reporting %s steps as %r to %s", phase, instance, settings.controller)
    return Reporting(agent, instance, phase)


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
            ds.awaiting[request.request_id] = request

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
    def _report_prefill(self, ds: Reporting, scheduled: dict[str, int]) -> None:
        # list comprehensions into array.array: the cheapest way from N Python objects to a buffer
        running = self.running  # type: ignore[attr-defined]
        # running requests still in prefill before this step: computed - this step's chunk < prompt
        chunks = [r for r in running if r.num_computed_tokens - scheduled.get(r.request_id, 0) < r.num_prompt_tokens]
        waiting = [*self.kv_holding_waiting, *self.waiting]  # type: ignore[attr-defined]
        reqs = chunks + waiting
        arrival = np.frombuffer(array("d", [r.arrival_time for r in reqs]))
        prompt = array("q", [r.num_prompt_tokens for r in reqs])
        prefilled = array("q", [r.num_computed_tokens - scheduled.get(r.request_id, 0) for r in chunks])
        prefilled.extend([r.num_computed_tokens for r in waiting])
        if len(reqs) > 1 and (arrival[1:] < arrival[:-1]).any():  # after a preemption, or priority scheduling
            order = np.argsort(arrival, kind="stable")
            arrival, prompt, prefilled = arrival[order], np.frombuffer(prompt, np.int64)[order], \
                np.frombuffer(prefilled, np.int64)[order]
        ds.agent.report_prefill(time.time(), arrival, prompt, prefilled, kv_util=self._kv_util(),
                                iteration_s=ds.iteration_s)

    def _report_decode(self, ds: Reporting) -> None:
        running = self.running  # type: ignore[attr-defined]
        if ds.first_changed or running != ds._batch:  # same requests in the same order: reuse the times
            get = ds.first_token_s.get
            ds._batch = list(running)
            ds._first = np.frombuffer(array("d", [get(r.request_id, _NAN) for r in running]))
            ds.first_changed = False
        first = ds._first
        # the private list behind Request.num_output_tokens: the property call costs about twice the
        # read per request (vLLM's release is pinned, and the tests compare with the property)
        tokens_out = array("q", [len(r._output_token_ids) for r in running])
        context = array("q", [r.num_computed_tokens for r in running])
        started = ~np.isnan(first)
        if not started.all():  # the others still wait for their first token: not the decode controller's yet
            first = first[started]
            tokens_out = np.frombuffer(tokens_out, np.int64)[started]
            context = np.frombuffer(context, np.int64)[started]
        ds.agent.report_decode(time.time(), first, tokens_out, context, kv_util=self._kv_util(),
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
            now = time.time()
            awaiting, first = ds.awaiting, ds.first_token_s
            scheduled = scheduler_output.num_scheduled_tokens
            small, big = (awaiting, scheduled) if len(awaiting) <= len(scheduled) else (scheduled, awaiting)
            for rid in [r for r in small if r in big]:
                if awaiting[rid].num_output_tokens > 0:
                    first[rid] = now
                    del awaiting[rid]
                    ds.first_changed = True
            for rid in scheduler_output.finished_req_ids:  # finished or aborted since the last schedule()
                awaiting.pop(rid, None)
                first.pop(rid, None)

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
