"""SGLang plugin: reports every scheduler iteration to the dualscale controller.

Installed with dualscale as an entry point of SGLang's plugin group ``sglang.srt.plugins``
(``pyproject.toml``), which SGLang's ``load_plugins()`` runs in each of its processes. Inert unless
configured: with neither ``DUALSCALE_CONTROLLER`` nor ``DUALSCALE_INSTANCE`` set (see
:mod:`dualscale.integrations.settings`), :func:`register` registers nothing. Configured, it checks
the installed SGLang against ``settings.SUPPORTED["sglang"]`` (scheduler internals are not a public
interface; outside the range it logs one error and registers nothing) and adds two hooks through
SGLang's ``HookRegistry``: after ``Scheduler.__init__`` (the worker agent is created) and around
``Scheduler.run_batch``, which every event loop (normal, overlap, P/D) calls once per iteration
with the batch it has just scheduled.

Ranks and role come from SGLang's runtime context (published before the scheduler is built):
only the scheduler SGLang itself uses for request I/O reports (``get_parallel()``: ``pp_rank``,
``attn_tp_rank`` and ``attn_cp_rank`` all 0; one per instance, one per attention-DP group); with
more than one data-parallel rank (``num_dp_ranks``: ``--dp-size`` replicas or DP attention) it
reports as ``<instance>-dp<dp_rank>``. Phase: ``get_disagg().disaggregation_mode``
(``prefill``/``decode``; ``null`` needs ``DUALSCALE_PHASE``), read once at start.

What an iteration reports (before the batch runs):

- prefill: the requests of an extend batch with prompt left before it, then ``waiting_queue``, in
  arrival order: arrival ``req.time_stats.wait_queue_entry_time`` (SGLang's ``time.perf_counter``
  clock, so ``now_s`` is on that clock too), prompt ``len(req.origin_input_ids)``, already in the
  KV cache ``req.prefix_len`` (where this round's extend starts: cached prefix plus earlier chunks);
- decode: ``running_batch.reqs`` that have output tokens: first-token time (when a report first sees
  ``req.output_ids`` non-empty: SGLang keeps no such time; up to one iteration late), tokens out
  ``len(req.output_ids)``, context prompt + output;
- KV use: SGLang's own token usage (``pool_stats_observer.get_pool_stats()``, as its load reports);
  the time between consecutive iterations.

A failure is logged once and reporting stops; SGLang goes on.
"""

from __future__ import annotations

import logging
import time
from array import array
from typing import Any

import numpy as np

from dualscale.integrations.settings import Phase, check_version, load_settings, resolve_phase

log = logging.getLogger("dualscale.integrations.sglang")

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
#: get_disagg().disaggregation_mode -> phase
MODE_PHASE: dict[str, Phase] = {"prefill": "prefill", "decode": "decode"}


def register() -> None:
    """SGLang's plugin entry point: add the hooks when dualscale is configured and the installed
    SGLang is a supported release, else nothing (an error logged when configured)."""
    try:
        settings = load_settings(None, "environment")
        if not settings.enabled:
            return
        import sglang

        check_version("sglang", sglang.__version__)
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except Exception as e:  # never stop SGLang
        log.error("dualscale: reporting is off: %s: %s", type(e).__name__, e)
        return
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
        start(sched)
    except Exception as e:  # never raise into the engine
        log.error("dualscale: reporting is off: %s: %s", type(e).__name__, e)


def start(sched: Any) -> None:
    """Give ``sched`` its reporting state when it is the scheduler its instance reports from."""
    from sglang.srt.runtime_context import get_disagg, get_parallel

    par = get_parallel()
    # the ranks SGLang itself talks to the tokenizer from: one per instance and attention-DP group
    if par.pp_rank != 0 or par.attn_tp_rank != 0 or par.attn_cp_rank != 0:
        return
    settings = load_settings(None, "environment")
    mode = str(get_disagg().disaggregation_mode)
    phase = resolve_phase(settings.phase, MODE_PHASE.get(mode), f"--disaggregation-mode {mode}")
    instance = settings.instance
    if par.num_dp_ranks > 1:
        instance = f"{instance}-dp{par.dp_rank or 0}"
    from dualscale.runtime.worker import WorkerAgent

    agent = WorkerAgent(settings.controller, instance, phase, keys_dir=settings.keys_dir or None)
    sched._dualscale = Reporting(agent, instance, phase)
    log.info("dualscale: reporting %s iterations as %r to %s", phase, instance, settings.controller)


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
    _, usage = sched.pool_stats_observer.get_pool_stats().get_kv_token_stats()
    return min(1.0, max(0.0, usage))


def _report(sched: Any, ds: Reporting, batch: Any) -> None:
    now = time.perf_counter()
    iteration_s = now - ds.last_s if ds.last_s else 0.0
    ds.last_s = now
    if ds.phase == "prefill":
        chunks = [r for r in (batch.reqs if batch is not None and batch.forward_mode.is_extend() else ())
                  if r.prefix_len < len(r.origin_input_ids)]
        reqs = chunks + list(sched.waiting_queue)
        arrival = np.frombuffer(array("d", [r.time_stats.wait_queue_entry_time for r in reqs]))
        prompt = np.frombuffer(array("q", [len(r.origin_input_ids) for r in reqs]), np.int64)
        prefilled = np.frombuffer(array("q", [r.prefix_len for r in reqs]), np.int64)
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
