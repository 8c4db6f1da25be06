"""The step with communication overlapped, predicted: compute and
communication simulated as two streams over the lowered order.

The runtime (`dtplan.runtime.overlap`) issues each collective as soon as its
input is ready, but no earlier than where the group of collectives before
its own was issued as lowered (one group ahead: FSDP's prefetch), keeps
their order, and waits for each at its first reader. `simulate` replays
that schedule with the cost model's times:

- the compute stream runs the graph's nodes in order, each for its
  `compute_s`, and a node starts only once every collective it reads has
  finished;
- the communication stream runs the collectives one at a time, in the order
  they are issued; a collective starts once it is issued and the one before
  it has finished.

A collective sits where lowering puts it: before the node that reads the
redistributed value (a hub's conversion: before the value's first reader;
a graph output's: at the end). Collectives with no compute between them
form a group, as the runtime groups them.

Without `skew` the result is never more than the serial step (compute +
communication, the integer program's objective): the simulated streams can
at worst run one after the other, and the slowdown charges at most the
hidden time. So the integer program minimises an upper bound of the
overlapped step (with skew: of all but the ranks' drift, which a measured
profile adds), and the predicted step the plan reports, the CLI prints
and the classic comparison ranks by is this simulation, alike for every
plan. What it leaves out: a collective slowing the compute it runs under
(`DeviceProfile.overlap_slowdown` scales the hidden part back in; ranks
drifting apart between collectives: `DeviceProfile.rank_skew`), several
collectives on different mesh axes running at once (one stream: an upper
bound), and the runtime's cap of two groups in flight.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Overlap", "simulate"]


@dataclass(frozen=True, slots=True)
class Overlap:
    """A simulated step: its length, and the communication it could not hide."""

    step_s: float
    compute_s: float
    comm_s: float
    #: time the compute stream waited on communication (with skew, on the other ranks too)
    exposed_s: float

    @property
    def hidden_s(self) -> float:
        return max(0.0, self.comm_s - self.exposed_s)


def simulate(
    order: Sequence[str],
    compute_s: Mapping[str, float],
    collectives: Sequence[tuple[str, str | None, int, float]],
    *,
    slowdown: float = 0.0,
    skew: float = 0.0,
) -> Overlap:
    """Simulate one step.

    `order`: the nodes in program order; `compute_s`: each node's time;
    `collectives`: (kind, producer node, position, seconds) in issue order as lowered, `position` the
    index in `order` of the node that waits for it (len(order): the end).
    `slowdown`: the fraction by which compute slows while a collective
    runs under it (the hidden time costs that fraction of itself). `skew`:
    ranks drift apart as they compute, so a collective starts only when
    the slowest has issued it: this fraction of the compute since the
    previous collective was issued, later than this rank issues it.
    """
    n = len(order)
    index = {name: i for i, name in enumerate(order)}
    colls = sorted(enumerate(collectives), key=lambda kc: (kc[1][2], kc[0]))
    # groups: no compute between consecutive collectives' positions
    work_before = [0] * (n + 1)  # nodes that compute, before each position
    done_before = [0.0] * (n + 1)  # compute (only) before each position
    for i, name in enumerate(order):
        t = compute_s.get(name, 0.0)
        work_before[i + 1] = work_before[i] + (t > 0)
        done_before[i + 1] = done_before[i] + t
    group, g = [], 0
    for k, (_, c) in enumerate(colls):
        if k and work_before[c[2]] > work_before[colls[k - 1][1][2]]:
            g += 1
        group.append(g)
    last_pos: dict[int, int] = {}
    for (_, c), gk in zip(colls, group, strict=True):
        last_pos[gk] = c[2]
    # each collective's earliest index: past its producer and past the previous
    # group's spot, and no earlier than the one before it (they keep their
    # order); one whose value is only returned (waited for at the end: a
    # graph output, a gradient bucket) past its producer and the returned one
    # before it: its result is held to the end anyway, so issuing it early
    # holds nothing longer (`dtplan.runtime.overlap`)
    returned = [c[2] == n for _, c in colls]
    gate, floor = [], {False: 0, True: 0}
    for (_, c), gk, back in zip(colls, group, returned, strict=True):
        g = max(floor[back], index[c[1]] + 1 if c[1] in index else 0, 0 if back or not gk else last_pos[gk - 1])
        floor[back] = g
        gate.append(g)
    # issued in the order the gates are reached (returned ones after the others at a tie)
    colls = [kc for _, _, _, kc in sorted((gate[k], returned[k], k, kc) for k, kc in enumerate(colls))]
    gate.sort()
    start_at = [0.0] * (n + 1)  # compute stream time when node i may start (before waits)
    finish = [0.0] * n
    done_at: dict[int, float] = {}  # collective k (sorted) -> its finish
    by_pos: dict[int, list[int]] = {}
    for k, (_, c) in enumerate(colls):
        by_pos.setdefault(c[2], []).append(k)
    nxt, comm_free, issued_last, cursor, gate_last = 0, 0.0, 0.0, 0.0, 0
    for i in range(n + 1):
        start_at[i] = cursor
        # issue, in order, every collective whose gate has been reached
        while nxt < len(colls) and gate[nxt] <= i:
            _, (_, prod, _, secs) = colls[nxt]
            ready = finish[index[prod]] if prod in index else 0.0
            issue = max(start_at[gate[nxt]], ready, issued_last)
            drift = skew * max(0.0, done_before[gate[nxt]] - done_before[gate_last])
            begin = max(issue + drift, comm_free)
            gate_last = gate[nxt]
            comm_free = done_at[nxt] = begin + secs
            issued_last = issue
            nxt += 1
        waits = [done_at[k] for k in by_pos.get(i, ())]
        begin = max([cursor, *waits])
        if i < n:
            finish[i] = begin + compute_s.get(order[i], 0.0)
            cursor = finish[i]
        else:
            cursor = begin
    step = max(cursor, comm_free)
    compute = done_before[n]
    comm = sum(c[3] for c in collectives)
    exposed = max(0.0, step - compute)  # waiting on collectives (and, with skew, on the other ranks)
    if slowdown:
        step += slowdown * max(0.0, comm - exposed)
    return Overlap(step_s=step, compute_s=compute, comm_s=comm, exposed_s=exposed)
