"""Serving-engine integrations: scheduler hooks that feed the controller daemon, one flag per engine.

- :mod:`dualscale.integrations.vllm`: vLLM v1 scheduler classes, enabled with
  ``--scheduler-cls dualscale.integrations.vllm.DualscaleAsyncScheduler``.
- :mod:`dualscale.integrations.sglang`: an SGLang plugin (entry point ``sglang.srt.plugins``), inert
  unless configured; tested on SGLang 0.5.23's real request, batch and hook-registry classes.
- :mod:`dualscale.integrations.settings`: where an engine hook finds the controller's address, its
  instance name and its phase (engine config or environment), and the installed-version check.

Each engine module imports its engine; nothing here is imported by ``import dualscale``.
"""
