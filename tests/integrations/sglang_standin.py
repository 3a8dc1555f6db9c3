"""A stand-in for the parts of SGLang the dualscale plugin touches (SGLang itself is an 11 GB
install whose scheduler cannot be built without a GPU).

Written from SGLang's source (python/sglang/srt/plugins/hook_registry.py, managers/scheduler.py,
managers/schedule_batch.py, metrics/collector.py), not copied: module paths, the hook registry's
``register(target, hook, HookType)`` and ``apply_hooks()`` with AFTER (``hook(result, *args)``) and
AROUND (``hook(original_fn, *args)``) semantics, and the scheduler attributes the plugin reads
(``server_args.disaggregation_mode``/``dp_size``, ``tp_rank``, ``pp_rank``, ``dp_rank``,
``waiting_queue``, ``running_batch.reqs``, ``token_to_kv_pool_allocator.available_size()``,
``tree_cache.evictable_size()``, ``max_total_num_tokens``; per request ``rid``,
``origin_input_ids``, ``output_ids``, ``prefix_indices``, ``time_stats.wait_queue_entry_time``;
per batch ``reqs`` and ``forward_mode.is_extend()``). The event loop is a simplified
``event_loop_normal``: FCFS chunked prefill, then decode steps. Nothing here checks that SGLang
still looks like this.
"""

from __future__ import annotations

import enum
import sys
import time
import types
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace


class HookType(enum.Enum):
    AFTER = "after"
    AROUND = "around"


class HookRegistry:
    hooks: dict[str, list] = defaultdict(list)

    @classmethod
    def register(cls, target: str, hook, hook_type: HookType = HookType.AFTER) -> None:
        cls.hooks[target].append((hook_type, hook))

    @classmethod
    def apply_hooks(cls) -> None:
        for target, hooks in cls.hooks.items():
            owner_path, attr = target.rsplit(".", 1)
            module_path, cls_name = owner_path.rsplit(".", 1)
            owner = getattr(sys.modules[module_path], cls_name)
            fn = getattr(owner, attr)
            for hook_type, hook in hooks:
                fn = _wrap(fn, hook, hook_type)
            setattr(owner, attr, fn)
        cls.hooks.clear()


def _wrap(original, hook, hook_type):
    if hook_type is HookType.AFTER:
        def after(*args, **kwargs):
            result = original(*args, **kwargs)
            new = hook(result, *args, **kwargs)
            return result if new is None else new
        return after

    def around(*args, **kwargs):
        return hook(original, *args, **kwargs)
    return around


class ForwardMode(enum.Enum):
    EXTEND = 1
    DECODE = 2

    def is_extend(self) -> bool:
        return self is ForwardMode.EXTEND


@dataclass
class Req:
    rid: str
    origin_input_ids: list
    max_new_tokens: int
    output_ids: list = field(default_factory=list)
    prefix_indices: list = field(default_factory=list)  # tokens in the KV cache before the next chunk
    time_stats: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(wait_queue_entry_time=0.0))


@dataclass
class ScheduleBatch:
    reqs: list
    forward_mode: ForwardMode = ForwardMode.DECODE


class Scheduler:
    """One GPU's scheduler: FCFS chunked prefill of ``chunk`` tokens per batch, else a decode step."""

    def __init__(self, mode: str = "null", *, tp_rank: int = 0, dp_size: int = 1, dp_rank: int | None = None,
                 max_total_num_tokens: int = 20_000, chunk: int = 512) -> None:
        self.server_args = SimpleNamespace(disaggregation_mode=mode, dp_size=dp_size)
        self.tp_rank, self.pp_rank, self.dp_rank = tp_rank, 0, dp_rank
        self.max_total_num_tokens = max_total_num_tokens
        self.chunk = chunk
        self.waiting_queue: list[Req] = []
        self.running_batch = ScheduleBatch([])
        self.chunked_req: Req | None = None
        self.token_to_kv_pool_allocator = SimpleNamespace(available_size=self._available)
        self.tree_cache = SimpleNamespace(evictable_size=lambda: 0)
        self.batches: list[tuple[ScheduleBatch, float]] = []  # what run_batch was called with, and when

    def _available(self) -> int:
        live = self.running_batch.reqs + ([self.chunked_req] if self.chunked_req else [])
        return self.max_total_num_tokens - sum(len(r.prefix_indices) + len(r.output_ids) for r in live)

    def add(self, req: Req) -> None:
        req.time_stats.wait_queue_entry_time = time.perf_counter()
        self.waiting_queue.append(req)

    def get_next_batch_to_run(self) -> ScheduleBatch | None:
        budget, reqs = self.chunk, []
        if self.chunked_req is not None:
            reqs.append(self.chunked_req)
            budget -= len(self.chunked_req.origin_input_ids) - len(self.chunked_req.prefix_indices)
            self.chunked_req = None
        while self.waiting_queue and budget > 0:
            r = self.waiting_queue.pop(0)
            reqs.append(r)
            budget -= len(r.origin_input_ids)
        if reqs:
            return ScheduleBatch(reqs, ForwardMode.EXTEND)
        return ScheduleBatch(list(self.running_batch.reqs)) if self.running_batch.reqs else None

    def run_batch(self, batch: ScheduleBatch) -> ScheduleBatch:
        self.batches.append((batch, time.perf_counter()))
        return batch

    def process_batch_result(self, batch: ScheduleBatch, result: ScheduleBatch) -> None:
        if batch.forward_mode.is_extend():
            budget = self.chunk
            for r in batch.reqs:
                take = min(budget, len(r.origin_input_ids) - len(r.prefix_indices))
                r.prefix_indices = r.prefix_indices + [0] * take
                budget -= take
                if len(r.prefix_indices) < len(r.origin_input_ids):
                    self.chunked_req = r
                    continue
                r.output_ids.append(7)
                if len(r.output_ids) < r.max_new_tokens:
                    self.running_batch.reqs.append(r)
            return
        for r in batch.reqs:
            r.output_ids.append(7)
        self.running_batch.reqs = [r for r in self.running_batch.reqs if len(r.output_ids) < r.max_new_tokens]

    def event_loop_step(self) -> bool:
        batch = self.get_next_batch_to_run()
        if batch is None:
            return False
        result = self.run_batch(batch)
        self.process_batch_result(batch, result)
        return True


def install() -> types.ModuleType:
    """Put the stand-in under SGLang's module names (for the plugin's imports) and return the
    scheduler module; call ``uninstall()`` after."""
    HookRegistry.hooks.clear()
    mods = {name: types.ModuleType(name) for name in (
        "sglang", "sglang.srt", "sglang.srt.plugins", "sglang.srt.plugins.hook_registry", "sglang.srt.managers",
        "sglang.srt.managers.scheduler")}
    hr, sched = mods["sglang.srt.plugins.hook_registry"], mods["sglang.srt.managers.scheduler"]
    hr.HookRegistry, hr.HookType = HookRegistry, HookType
    # a fresh class per install: applied hooks must not leak between tests
    sched.Scheduler = type("Scheduler", (Scheduler,), {})
    sys.modules.update(mods)
    return sched


def uninstall() -> None:
    for name in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
        del sys.modules[name]
    HookRegistry.hooks.clear()
