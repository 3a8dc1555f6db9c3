"""A load generator for calibration sweeps: requests of varied shapes to an OpenAI-compatible
completions endpoint (vLLM's, SGLang's, or a P/D proxy in front of them), at a Poisson rate.

A profile fit needs batches of many shapes at every clock: prompts are drawn log-uniform between
``prompt_words`` bounds (one word is about 1.3 tokens for English text) and outputs log-uniform
between ``max_tokens`` bounds, so prefill sees short and long chunks and decode small and large
batches with short and long contexts. Standard library only (``urllib`` in a thread pool): the
generator runs on the GPU node beside the sweep, where no extra package is wanted.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

_WORDS = ("energy clock prefill decode batch token latency power cache model request queue throughput "
          "kernel memory tensor").split()


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    last_error: str = ""


class LoadGenerator:
    """Sends completions requests to ``url`` from a background thread until :meth:`stop`.

    Args:
        url: the endpoint, e.g. ``http://127.0.0.1:8000/v1/completions``.
        model: the served model's name (the ``model`` field of each request).
        rate_per_s: mean request rate (Poisson arrivals).
        prompt_words: (least, most) words of a prompt.
        max_tokens: (least, most) output tokens of a request.
        concurrency: requests in flight at most (more wait their turn).
        seed: the draws' seed.
        timeout_s: per request.
    """

    def __init__(self, url: str, model: str, rate_per_s: float, prompt_words: tuple[int, int] = (16, 3000),
                 max_tokens: tuple[int, int] = (8, 512), concurrency: int = 64, seed: int = 0,
                 timeout_s: float = 600.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"load url = {url!r}: expected http:// or https:// (an OpenAI-compatible endpoint)")
        if not rate_per_s > 0:
            raise ValueError(f"load rate = {rate_per_s}: must be > 0 requests/s")
        for name, (lo, hi) in (("prompt_words", prompt_words), ("max_tokens", max_tokens)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} = {(lo, hi)}: expected 1 <= least <= most")
        self.url, self.model, self.rate_per_s = url, model, rate_per_s
        self.prompt_words, self.max_tokens, self.timeout_s = prompt_words, max_tokens, timeout_s
        self.rng = np.random.default_rng(seed)
        self.stats = LoadStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="dualscale-load")
        self._thread = threading.Thread(target=self._run, name="dualscale-load", daemon=True)

    def _log_uniform(self, lo: int, hi: int) -> int:
        return int(round(float(np.exp(self.rng.uniform(np.log(lo), np.log(hi))))))

    def body(self) -> dict[str, object]:
        """One request of a random shape."""
        n = self._log_uniform(*self.prompt_words)
        words = self.rng.choice(_WORDS, size=n)
        return {"model": self.model, "prompt": " ".join(words.tolist()),
                "max_tokens": self._log_uniform(*self.max_tokens), "temperature": 0.0, "ignore_eos": True}

    def _send(self, body: dict[str, object]) -> None:
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
            with self._lock:
                self.stats.ok += 1
        except (urllib.error.URLError, OSError, ValueError) as e:
            with self._lock:
                self.stats.failed += 1
                self.stats.last_error = str(e)

    def _run(self) -> None:
        while not self._stop.wait(float(self.rng.exponential(1.0 / self.rate_per_s))):
            body = self.body()
            with self._lock:
                self.stats.sent += 1
            self._pool.submit(self._send, body)

    def start(self) -> LoadGenerator:
        self._thread.start()
        return self

    def stop(self, wait: bool = False) -> None:
        """Stop sending; ``wait`` for the requests in flight too."""
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
