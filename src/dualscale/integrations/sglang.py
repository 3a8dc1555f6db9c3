"""SGLang plugin: reports every scheduler iteration to the dualscale controller.

Installed with dualscale as an entry point of SGLang's plugin group ``sglang.srt.plugins``
(``pyproject.toml``), which SGLang loads in each of its processes. Inert unless configured: with
neither ``DUALSCALE_CONTROLLER`` nor ``DUALSCALE_INSTANCE`` set (see
:mod:`dualscale.integrations.settings`), :func:`register` registers nothing. Configured, it adds two
hooks through SGLang's ``HookRegistry``: after ``Scheduler.__init__`` (the worker agent is created,
on the scheduler of TP rank 0 only: SGLang runs one scheduler per GPU, the instance reports once) and
around ``Scheduler.run_batch``, which every event loop (normal, overlap, P/D) calls once per
iteration with the batch it has just scheduled.

Phase: ``--disaggregation-mode`` (``prefill``/``decode``; ``null`` needs ``DUALSCALE_PHASE``).
With ``--dp-size`` > 1 each rank reports as ``<instance>-dp<rank>``.

What an iteration reports (before the batch runs), read from these scheduler attributes:

- prefill: the requests of the batch still in prefill, then ``waiting_queue``, in arrival order:
  arrival ``req.time_stats.wait_queue_entry_time`` (SGLang's ``time.perf_counter`` clock, so
  ``now_s`` is on that clock too), prompt ``len(req.origin_input_ids)``, already in the KV cache
  ``len(req.prefix_indices)`` (cached prefix and earlier chunks);
- decode: ``running_batch.reqs`` that have output tokens: first-token time (when a report first sees
  ``req.output_ids`` non-empty: SGLang keeps no such time; up to one iteration late), tokens out
  ``len(req.output_ids)``, context prompt + output;
- KV use: ``1 - (token_to_kv_pool_allocator.available_size() + tree_cache.evictable_size()) /
  max_total_num_tokens`` (SGLang's own token usage); the time between consecutive iterations.

NOT tested against SGLang itself (an 11 GB install whose scheduler cannot be built without a GPU):
the tests drive a stand-in with the attributes above (``tests/integrations/sglang_standin.py``),
written from SGLang's source. A failure is logged once and reporting stops; SGLang goes on.
"""

from __future__ import annotations

import logging
import time
from array import array
from typing import Any

import numpy as np

from dualscale.integrations.settings import Phase, load_settings, resolve_phase

log = logging.getLogger("dualscale.integrations.sglang")

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
#: --disaggregation-mode -> phase
MODE_PHASE: dict[str, Phase] = {"prefill": "prefill", "decode": "decode"}


def register() -> None:
    """SGLang's plugin entry point: add the hooks when dualscale is configured, else nothing."""
    try:
        settings = load_settings(None, "environment")
    except Exception as e:  # never stop SGLang
        log.error("dualscale: reporting is off: %s: %s", type(e).__name__, e)
        return
    if not settings.enabled:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{SCHEDULER}.__init__", _after_init, HookType.AFTER)
    HookRegistry.register(f"{SCHEDULER}.run_batch", _around_run_batch, HookType.AROUND)


class Reporting:
    """One scheduler's reporting state (``scheduler._dualscale``)."""

    def __init__(self, agent: Any, instance: str, phase: Phase) -> None:
        self.agent = agent
        self.instance = instance
        self.phase = phase
        self.first_token_s: dict[str, float] = {}  # decode: by request id
        self.last_s = 0.0
        self.failed: BaseException | None = None


def _after_init(result: Any, sched: Any, *args: Any, **kwargs: Any) -> None:
    sched._dualscale = None
    try:
        if getattr(sched, "tp_rank", 0) != 0 or getattr(sched, "pp_rank", 0) != 0:
            return  # one report per instance: from its first GPU's scheduler
        sa = sched.server_args
        settings = load_settings(None, "environment")
        mode = str(getattr(sa, "disaggregation_mode", "null"))
        phase = resolve_phase(settings.phase, MODE_PHASE.get(mode), f"--disaggregation-mode {mode}")
        instance = settings.instance
        if getattr(sa, "dp_size", 1) > 1:
            instance = f"{instance}-dp{sched.dp_rank or 0}"
        from dualscale.runtime.worker import WorkerAgent

        sched._dualscale = Reporting(WorkerAgent(settings.controller, instance, phase, keys_dir=settings.keys_dir or None), instance, phase)
        log.info("dualscale: reporting %s iterations as %r to %s", phase, instance, settings.controller)
    except Exception as e:  # never raise into the engine
        log.error("dualscale: reporting is off: %s: %s", type(e).__name__, e)


def _around_run_batch(original_fn: Any, sched: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    ds = getattr(sched, "_dualscale", None)
    if ds is not None:
        try:
            _report(sched, ds, batch)
        except Exception as e:
            ds.failed = e
            sched._dualscale = None
            log.error("dualscale: reporting stopped after an unexpected error (the engine goes on)", exc_info=e)
            try:
                ds.agent.close()
            except Exception as e2:
                log.error("dualscale: closing the worker agent: %s: %s", type(e2).__name__, e2)
    return original_fn(sched, batch, *args, **kwargs)


def _kv_util(sched: Any) -> float:
    free = sched.token_to_kv_pool_allocator.available_size() + sched.tree_cache.evictable_size()
    return min(1.0, max(0.0, 1.0 - free / sched.max_total_num_tokens))


def _report(sched: Any, ds: Reporting, batch: Any) -> None:
    now = time.perf_counter()
    iteration_s = now - ds.last_s if ds.last_s else 0.0
    ds.last_s = now
    if ds.phase == "prefill":
        chunks = [r for r in (batch.reqs if batch is not None and batch.forward_mode.is_extend() else ())
                  if len(r.prefix_indices) < len(r.origin_input_ids)]
        reqs = chunks + list(sched.waiting_queue)
        arrival = np.frombuffer(array("d", [r.time_stats.wait_queue_entry_time for r in reqs]))
        prompt = np.frombuffer(array("q", [len(r.origin_input_ids) for r in reqs]), np.int64)
        prefilled = np.frombuffer(array("q", [len(r.prefix_indices) for r in reqs]), np.int64)
        if len(reqs) > 1 and (arrival[1:] < arrival[:-1]).any():
            order = np.argsort(arrival, kind="stable")
            arrival, prompt, prefilled = arrival[order], prompt[order], prefilled[order]
        ds.agent.report_prefill(now, arrival, prompt, prefilled, kv_util=_kv_util(sched), iteration_s=iteration_s)
        return
    running = [r for r in sched.running_batch.reqs if r.output_ids]
    first = ds.first_token_s
    for r in running:
        if r.rid not in first:
            first[r.rid] = now
    if len(first) > 2 * len(running) + 64:  # forget finished requests
        live = {r.rid for r in running}
        for rid in [rid for rid in first if rid not in live]:
            del first[rid]
    first_s = np.frombuffer(array("d", [first[r.rid] for r in running]))
    tokens_out = array("q", [len(r.output_ids) for r in running])
    context = array("q", [len(r.origin_input_ids) + len(r.output_ids) for r in running])
    ds.agent.report_decode(now, first_s, tokens_out, context, kv_util=_kv_util(sched), iteration_s=iteration_s)
