"""From the coarse tier's PlacementPlan to named instances on nodes' GPUs (what the daemon publishes).

A plan says how many instances of each (phase, TP, baseline clock) to run; a deployment also needs
which GPUs each one uses. Tensor parallelism stays inside one node (NVLink), so instances are
packed first-fit, largest TP first, onto contiguous free GPUs of a node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dualscale.placement.ilp import PlacementPlan
from dualscale.runtime.messages import Phase, PlanInstance


def assign(plan: PlacementPlan, nodes: Mapping[str, Sequence[int]]) -> list[PlanInstance]:
    """Named instances (``prefill-0``, ``decode-0``, ...) of ``plan`` on the GPUs of ``nodes``.

    Args:
        plan: the placement to deploy.
        nodes: node name -> the GPU indices it offers, e.g. ``{"node0": range(8), "node1": range(8)}``.

    Raises:
        ValueError: an instance finds no node with enough contiguous free GPUs (names it and the
            GPUs left per node).
    """
    free = {name: sorted(int(g) for g in gpus) for name, gpus in nodes.items()}
    wanted = [(g.phase, g.tp, g.freq_mhz, g.rate_per_s) for g in plan.groups for _ in range(g.instances)]
    wanted.sort(key=lambda w: -w[1])  # largest TP first: fewer stranded GPUs
    counters = {"prefill": 0, "decode": 0}
    out = []
    for phase, tp, freq_mhz, weight in wanted:
        name = f"{phase}-{counters[phase]}"
        for node, gpus in free.items():
            start = next((i for i in range(len(gpus) - tp + 1) if gpus[i + tp - 1] - gpus[i] == tp - 1), None)
            if start is not None:
                taken = gpus[start:start + tp]
                del gpus[start:start + tp]
                break
        else:
            left = {n: len(g) for n, g in free.items()}
            raise ValueError(f"{name} (TP{tp}): no node has {tp} contiguous free GPUs; free GPUs per node: {left}")
        counters[phase] += 1
        out.append(PlanInstance(name, Phase.PREFILL if phase == "prefill" else Phase.DECODE, tp, node, taken,
                                freq_mhz, weight if weight > 0 else 1e-6))
    return out
