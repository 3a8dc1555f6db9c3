"""The engine's chunking rule, as the prefill controller projects it: the next batch of an FCFS
queue. Public so that a simulator forms its batches by the very rule the controller plans with."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from dualscale._kernels import mpc


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
