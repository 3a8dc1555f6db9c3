"""The engine's chunking rule, as the prefill controller projects it: the next batch of an FCFS
queue. Public so that a simulator forms its batches by the very rule the controller plans with
(:class:`BatchFormer`, and :class:`PrefillStepper`, a simulated prefill instance's batches many
per call)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from dualscale._kernels import mpc
from dualscale._kernels import perf_model as pm
from dualscale._kernels import stepping as st
from dualscale.control.decode import Plant, _Stepper
from dualscale.profile import Profile


class BatchFormer:
    """Forms the next prefill batch of at most ``max_batch_tokens`` prompt tokens (reusable
    workspaces; inputs are trusted: int64 arrays, ``0 <= prefilled < prompt``, as
    :meth:`PrefillController.decide` checks them)."""

    def __init__(self, max_batch_tokens: int) -> None:
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, (int, np.integer)) \
                or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens = {max_batch_tokens!r}: must be a whole number >= 1")
        self.max_batch_tokens = int(max_batch_tokens)
        self._bounds = np.zeros(2, dtype=np.int64)
        self._batch_tokens = np.zeros(1, dtype=np.int64)
        self._grow(64)

    def _grow(self, n: int) -> None:
        self._chunk_tokens = np.empty(n + 1, dtype=np.int64)
        self._chunk_prefix = np.empty(n + 1, dtype=np.int64)
        self._done = np.empty(n, dtype=np.int64)

    def next_batch(self, prompt_tokens: NDArray[np.int64],
                   prefilled_tokens: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(chunk tokens, prefix tokens) of the next batch: one chunk per request, from the head of
        the queue, the last one possibly partial. Views into workspaces: copy to keep them."""
        n = prompt_tokens.shape[0]
        if n > self._done.shape[0]:
            self._grow(max(n, 2 * self._done.shape[0]))
        tokens = np.stack([prompt_tokens, prefilled_tokens])
        mpc.project(tokens, self.max_batch_tokens, 1, self._chunk_tokens, self._chunk_prefix, self._bounds,
                    self._done, self._batch_tokens)
        k = int(self._bounds[1])
        return self._chunk_tokens[:k], self._chunk_prefix[:k]


class PrefillStepper(_Stepper):
    """A simulated prefill instance's batches, formed by the rule of :class:`BatchFormer`, many per
    call: the compiled fast path of a simulator for a fixed clock (with a controller, given as
    None, the caller decides every batch: :attr:`NEED_DECISION`).

    Each batch starts when the last ends (or when a request arrives at an idle instance), runs on
    ``plant`` at the clock asked for (a switch lands after ``switch_delay_s``), and at its end the
    requests whose prompt completed emit their first token: they finish (``prefill_only``, or a
    single output token) or are handed back to the caller (:meth:`routed`) to go on to decode; a
    boundary that hands requests back ends the call, at its time.

    Args:
        profile, tp, idle_freq_mhz, requests, plant, switch_delay_s, rng: as :class:`DecodeStepper`.
        fixed_mhz: the clock of every batch, or None (the caller decides).
        max_batch_tokens: prompt tokens per batch (the chunking budget).
        prefill_only: requests finish with their first token (prefill simulated alone).
    """

    def __init__(self, profile: Profile, tp: int, fixed_mhz: int | None, *, idle_freq_mhz: int,
                 requests: tuple[NDArray[np.int64], NDArray[np.float64]], plant: Plant, switch_delay_s: float,
                 max_batch_tokens: int, prefill_only: bool, rng: np.random.Generator | None = None) -> None:
        super().__init__(profile, "prefill", tp, fixed_mhz, idle_freq_mhz, requests, plant, switch_delay_s, rng)
        self.pv[pm.N_COEF + st.P_MAX_BATCH_TOKENS] = max_batch_tokens
        self.si[st.S_ONLY] = 1 if prefill_only else 0
        self.queue = np.zeros((st.N_QU, 64), dtype=np.int64)
        self.work = np.zeros((3, 65), dtype=np.int64)
        self.small = np.zeros(3, dtype=np.int64)
        self.routed_ = np.zeros(64, dtype=np.int64)

    def _kernel(self, t_s: float, horizon_s: float, entry: int) -> tuple[int, float]:
        return st.advance_prefill(t_s, horizon_s, entry, self.si, self.sf, self.queue, self.work, self.small,
                                  self.routed_, self.req_i, self.req_f, self.pv, self.p_rows, self.p_int, self.cv,
                                  self.tl_f, self.tl_i, self.rng)

    def enqueue(self, request: int) -> None:
        """A request arrived here: it joins the queue's tail."""
        head, tail = int(self.si[st.S_W_HEAD]), int(self.si[st.S_W_TAIL])
        if tail == self.queue.shape[1]:  # move the live part to the front, growing when over half full
            live = self.queue[:, head:tail].copy()
            if 2 * live.shape[1] > self.queue.shape[1]:
                self.queue = self._grow(self.queue, 2 * live.shape[1] + 1)
                self.work = np.zeros((3, self.queue.shape[1] + 1), dtype=np.int64)
                self.routed_ = np.zeros(self.queue.shape[1], dtype=np.int64)
            self.queue[:, :live.shape[1]] = live
            tail = live.shape[1]
            self.si[st.S_W_HEAD] = 0
        r = int(request)
        prompt = int(self.req_i[st.R_PROMPT, r])
        done = int(self.req_i[st.R_PREFILLED, r])
        self.queue[:, tail] = (r, prompt, done)
        self.si[st.S_W_TAIL] = tail + 1
        self.si[st.S_LOAD] += prompt - done

    @property
    def load_tokens(self) -> int:
        """Prompt tokens queued and not yet prefilled (the router's load)."""
        return int(self.si[st.S_LOAD])

    def routed(self) -> NDArray[np.int64]:
        """Requests whose prompt completed at the boundary the last call ran, to go on to decode."""
        return self.routed_[:int(self.si[st.S_ROUTE_N])]

    def queue_views(self) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """(request ids, prompt tokens, tokens prefilled) of the queue, FCFS (views: read only)."""
        head, tail = int(self.si[st.S_W_HEAD]), int(self.si[st.S_W_TAIL])
        q = self.queue[:, head:tail]
        return q[st.QU_RID], q[st.QU_PROMPT], q[st.QU_DONE]
