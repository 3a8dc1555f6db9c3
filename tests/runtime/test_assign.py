"""Placement plans become named instances on distinct GPUs, TP groups inside one node."""

from __future__ import annotations

import pytest

from dualscale.placement.ilp import PlacementGroup, PlacementPlan
from dualscale.runtime.assign import assign
from dualscale.runtime.messages import Phase


def plan(groups):
    return PlacementPlan(10.0, 0.05, 16, sum(g.tp * g.instances for g in groups), groups, 0.0, 300.0, 0.0, True, "",
                         "load")


def test_paper_placement_on_two_nodes():
    p = plan([PlacementGroup("prefill", 2, 1425, 2, 1.3, 1.0, 0.0), PlacementGroup("decode", 4, 885, 1, 16.0, 10.5, 0.0),
              PlacementGroup("prefill", 4, 1245, 2, 3.1, 3.5, 0.0)])
    insts = assign(p, {"node0": range(8), "node1": range(8)})
    assert sorted(i.name for i in insts) == ["decode-0", "prefill-0", "prefill-1", "prefill-2", "prefill-3"]
    used = [(i.node, g) for i in insts for g in i.gpus]
    assert len(used) == len(set(used)) == 16  # 2 x 4 + 4 + 2 x 2 GPUs, none twice
    for i in insts:
        assert len(i.gpus) == i.tp and i.gpus == list(range(i.gpus[0], i.gpus[0] + i.tp))
    dec = next(i for i in insts if i.name == "decode-0")
    assert (dec.phase, dec.base_freq_mhz, dec.weight) == (Phase.DECODE, 885, 10.5)


def test_no_room_names_the_instance_and_what_is_left():
    p = plan([PlacementGroup("prefill", 8, 1980, 2, 6.0, 5.0, 0.0)])
    with pytest.raises(ValueError, match=r"prefill-1 \(TP8\): no node has 8 contiguous free GPUs; .*'node0': 0"):
        assign(p, {"node0": range(8), "node1": [0, 1, 2, 3, 5, 6, 7, 8]})
