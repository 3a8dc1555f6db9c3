"""Builds and drives vLLM's real v1 scheduler on the CPU, with no GPU and no model download.

As vLLM's own tests/v1/core do: a folder holding only a tiny Llama ``config.json`` is enough for
``ModelConfig``; the KV cache is a plain full-attention group of ``num_blocks`` blocks; the model
runner is replaced by fabricated ``ModelRunnerOutput``s (a sampled token for every request whose
prompt is fully computed after the step, none for a partial prefill chunk, as the real runner does).
``EngineLoop`` calls the scheduler in the order vLLM's engine core does: ``step()`` (schedule, run,
update) for the synchronous scheduler, ``step_with_batch_queue()`` (two batches in flight) for the
async one.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

BLOCK = 16
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
              "vocab_size": 1000, "max_position_embeddings": 8192, "torch_dtype": "float32"}


def model_config(folder: Path) -> ModelConfig:
    """The tiny model's config (slow: ~10-20 s; build once per session)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    return ModelConfig(model=str(folder), tokenizer=None, skip_tokenizer_init=True, max_model_len=8192,
                       dtype="float32")


def make_scheduler(cls: type[Scheduler], mc: ModelConfig, *, async_scheduling: bool, num_blocks: int = 1000,
                   max_num_seqs: int = 64, max_batched_tokens: int = 512, kv_role: str | None = None,
                   kv_path: Path | None = None, additional_config: dict | None = None,
                   data_parallel: tuple[int, int] | None = None) -> Scheduler:
    """A real vLLM scheduler of class ``cls``; ``kv_role`` adds vLLM's ExampleConnector (a KV connector
    that works without a GPU) in that role; ``data_parallel`` = (size, rank) as the engine core sees it."""
    sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens, max_model_len=8192,
                         is_encoder_decoder=False, enable_chunked_prefill=True, async_scheduling=async_scheduling)
    cc = CacheConfig(block_size=BLOCK, cache_dtype="auto")
    cc.num_gpu_blocks = num_blocks
    ktc = None
    if kv_role is not None:
        ktc = KVTransferConfig(kv_connector="ExampleConnector", kv_role=kv_role,
                               kv_connector_extra_config={"shared_storage_path": str(kv_path)})
    vc = VllmConfig(scheduler_config=sc, model_config=mc, cache_config=cc, kv_transfer_config=ktc,
                    additional_config=additional_config or {})
    if data_parallel is not None:
        vc.parallel_config.data_parallel_size, vc.parallel_config.data_parallel_rank = data_parallel
    return build_scheduler(cls, vc, num_blocks)


def build_scheduler(cls: type[Scheduler], vc: VllmConfig, num_blocks: int = 1000) -> Scheduler:
    """A scheduler of class ``cls`` for ``vc``, constructed as vLLM's EngineCore does, over a KV cache
    of one full-attention group (what the GPU workers would have allocated)."""
    vc.cache_config.num_gpu_blocks = num_blocks
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer.0"], FullAttentionSpec(block_size=vc.cache_config.block_size, num_kv_heads=1,
                                                        head_size=1, dtype=torch.float32))])
    return cls(vllm_config=vc, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(vc),
               block_size=vc.cache_config.block_size, log_stats=False)


def request(rid: str, prompt_tokens: int, max_tokens: int, arrival_s: float | None = None) -> Request:
    return Request(request_id=rid, prompt_token_ids=[7] * prompt_tokens, sampling_params=SamplingParams(
        max_tokens=max_tokens, ignore_eos=True), pooling_params=None,
        arrival_time=time.time() if arrival_s is None else arrival_s)


def fake_output(sched: Scheduler, out: Any, done_prompt: set[str]) -> ModelRunnerOutput:
    """What the model runner would return for ``out``: one token per request whose prompt was complete
    after that step's schedule() (``done_prompt``, recorded then), none for a partial chunk."""
    ids = list(out.num_scheduled_tokens)
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=[[11] if r in done_prompt else [] for r in ids])


@dataclass
class EngineLoop:
    """Drives a scheduler as vLLM's engine core does; ``on_schedule`` sees the scheduler right after
    each schedule() (the state a report is made from), ``on_update`` right after each
    update_from_output() with the wall-clock times around that call."""

    sched: Scheduler
    async_scheduling: bool
    on_schedule: Callable[[Scheduler, Any], None] = lambda s, o: None
    on_update: Callable[[Scheduler, float, float], None] = lambda s, t0, t1: None
    in_flight: deque = field(default_factory=deque)
    steps: int = 0

    def _schedule(self) -> None:
        out = self.sched.schedule()
        done = {r for r in out.num_scheduled_tokens
                if self.sched.requests[r].num_computed_tokens >= self.sched.requests[r].num_prompt_tokens}
        self.on_schedule(self.sched, out)
        self.in_flight.appendleft((out, done))
        self.steps += 1

    def _update(self) -> None:
        out, done = self.in_flight.pop()
        t0 = time.time()
        self.sched.update_from_output(out, fake_output(self.sched, out, done))
        self.on_update(self.sched, t0, time.time())

    def step(self) -> None:
        if not self.async_scheduling:  # EngineCore.step
            if not self.sched.has_requests():
                return
            self._schedule()
            self._update()
            return
        # EngineCore.step_with_batch_queue with a queue of two
        if self.sched.has_requests():
            self._schedule()
            out = self.in_flight[0][0]
            if len(self.in_flight) < 2 and (out.total_num_scheduled_tokens > 0 or self.sched.has_requests()):
                return
        elif not self.in_flight:
            return
        self._update()

    def run_until_idle(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_requests() and not self.in_flight:
                return
            self.step()
        raise AssertionError(f"still busy after {max_steps} steps")


def prefill_queue(s: Scheduler, out: Any) -> tuple[list[float], list[int], list[int]]:
    """The prefill queue as the scheduler holds it right after schedule(): every request with prompt
    left before this step (running chunks, then the waiting queues), in arrival order: (arrival time,
    prompt tokens, tokens computed before this step)."""
    q = []
    for r in s.running:
        before = r.num_computed_tokens - out.num_scheduled_tokens.get(r.request_id, 0)
        if before < r.num_prompt_tokens:
            q.append((r.arrival_time, r.num_prompt_tokens, before))
    q += [(r.arrival_time, r.num_prompt_tokens, r.num_computed_tokens) for r in [*s.kv_holding_waiting, *s.waiting]]
    q.sort(key=lambda x: x[0])
    return [x[0] for x in q], [x[1] for x in q], [x[2] for x in q]
