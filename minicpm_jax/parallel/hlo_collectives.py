"""The collectives of one compiled step, read from its optimized HLO text: count and bytes per kind.

Every computation reachable from the entry is visited with a multiplier: a while loop's body runs its
trip count times per execution of its caller (the layer scan, the micro-batch scan), any other called
computation (fusions, async wrappers, branches, reductions) once. A collective inside a loop therefore
counts once per iteration. The trip count is XLA's `known_trip_count` where the backend writes it (CPU,
GPU), else it is read from the loop condition `i < N`, N a constant or a constant carried in the loop's
initial tuple (what XLA:TPU leaves). Loops whose bound is data-dependent count once and are reported
in `unknown_trip_counts`. Unreachable computations (clones XLA leaves in the text) are not counted.

Two byte counts per kind. `bytes` is the size of the logical tensor each collective moves, independent
of the device count: an all-gather counts its (gathered) result, a reduce-scatter its (unscattered)
operand, an all-reduce, all-to-all or collective-permute its operands. `wire_bytes` is what one device
sends under ring algorithms over its replica group of g devices: (g-1)/g of the logical bytes for an
all-gather, reduce-scatter or all-to-all, twice that for an all-reduce (a reduce-scatter then an
all-gather), all of them for a collective-permute. Only the wire count is fair to a collective split in
stages over the axes of a torus (8 then 8 devices instead of 64): each stage moves a smaller share.
The `-done` halves of asynchronous pairs are not counted.
XLA:TPU also splits one collective into an async start, continuation pieces placed in later
computations (even inside a loop that follows) and a done, all with one channel_id: each channel is
counted once, at its outermost placement.

XLA:TPU writes a reduce-scatter it emits as one fused kernel as a fusion whose body is an all-reduce and
a dynamic slice, with the emitter `AllReduceScatterFusion` or `SingleInputAllReduceScatterFusion` in its
backend config. Such an all-reduce is counted as the reduce-scatter it runs as.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
             "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLED = re.compile(r"(?:calls|to_apply|condition|body|branch_computations)=\{?((?:%[\w.\-]+(?:, )?)+)\}?")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_NAME = re.compile(r"%([\w.\-]+)")
_REDUCE_SCATTER_FUSION = re.compile(r'calls=%([\w.\-]+).*"emitter":"(?:SingleInput)?AllReduceScatterFusion"')


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
# Share of the logical bytes one device sends per device of its group (a ring over g devices: (g-1)/g).
_RING_PASSES = {"all-gather": 1, "reduce-scatter": 1, "all-to-all": 1, "all-reduce": 2}


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    count: int  # executions per step (loop trip counts multiplied in)
    bytes: int  # logical bytes moved per step
    wire_bytes: int  # bytes one device sends per step under ring algorithms


@dataclasses.dataclass(frozen=True)
class Report:
    by_kind: dict[str, Collective]
    unknown_trip_counts: int  # while loops counted once because their bound is not a constant

    @property
    def wire_bytes(self) -> int:
        """Bytes one device sends per step, all kinds (what FSDP's minimum is counted in)."""
        return sum(c.wire_bytes for c in self.by_kind.values())


def group_size(rest: str, num_devices: int) -> int:
    """Devices in each replica group of a collective (its instruction text after the opcode), in any of the
    three notations XLA writes: mesh axes (`mesh['axis_0'=8,'axis_1'=8] {'axis_1'}`), iota (`[8,8]<=[64]`:
    8 groups of 8) or listed groups (`{{0,1,2,3},...}`); empty groups mean all `num_devices`."""
    mesh = _MESH_GROUPS.search(rest)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[axis]) for axis in re.findall(r"'(\w+)'", mesh.group(2)))
    iota = _IOTA_GROUPS.search(rest)
    if iota:
        return int(iota.group(1).split(",")[-1])
    listed = _LISTED_GROUPS.search(rest)
    return len(listed.group(1).split(",")) if listed and listed.group(1) else num_devices


def ring_wire_bytes(kind: str, size: int, group: int) -> int:
    """What one device sends for a collective of `size` logical bytes over `group` devices."""
    if kind == "collective-permute":
        return size
    return _RING_PASSES[kind] * size * (group - 1) // max(group, 1)


def shape_bytes(text: str) -> int:
    """Bytes of every array in an HLO shape or operand list (a tuple's elements added up)."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _ITEMSIZE:
            total += _ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _parse(hlo_text: str):
    """(entry name, {computation: [(name, result shape, opcode, rest of line)]}, {name: (shape, opcode, rest)}).

    Operands are written by name, and instruction names are unique within a module, hence the last index.
    """
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        if current is None:
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            computations[current].append(instruction.groups())
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    by_name = {name: (shape, opcode, rest) for body in computations.values() for name, shape, opcode, rest in body}
    return entry, computations, by_name


def _operands(rest: str) -> str:
    """The operand list of an instruction: the text up to the parenthesis that closes it."""
    depth = 1
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[:i]
    return rest


def _trip_count(rest: str, computations: dict, by_name: dict) -> int | None:
    """Iterations of the while loop whose instruction text (after the opcode) is `rest`, or None."""
    known = _TRIP_COUNT.search(rest)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.\-]+)", rest)
    init = _NAME.findall(_operands(rest))
    compare = next((r for _, _, op, r in computations.get(condition.group(1) if condition else "", ())
                    if op == "compare" and "direction=LT" in r), None)
    if compare is None or len(init) != 1:
        return None

    def value(name: str) -> int | None:
        _, opcode, operand_text = by_name.get(name, ("", "", ""))
        if opcode == "constant":
            match = re.match(r"\s*(-?\d+)\)", operand_text)
            return int(match.group(1)) if match else None
        if opcode == "get-tuple-element":  # of the loop state: the initial tuple's element
            index = re.search(r"index=(\d+)", operand_text)
            _, init_op, init_text = by_name.get(init[0], ("", "", ""))
            elements = _NAME.findall(_operands(init_text)) if init_op == "tuple" else []
            if index and int(index.group(1)) < len(elements):
                element = elements[int(index.group(1))]
                return value(element) if by_name.get(element, ("", ""))[1] == "constant" else None
        return None

    operands = _NAME.findall(_operands(compare))
    if len(operands) != 2:
        return None
    start, bound = value(operands[0]), value(operands[1])
    return None if bound is None else bound - (start or 0)


def _call_multipliers(entry: str, computations: dict, by_name: dict) -> tuple[dict[str, int], int]:
    """(how many times each computation reachable from `entry` runs per execution of the entry,
    the number of loops whose trip count could not be read)."""
    calls: dict[str, list[tuple[str, int]]] = {}
    unknown = 0
    for name, body in computations.items():
        calls[name] = []
        for _, _, opcode, rest in body:
            trips = 1
            if opcode == "while":
                trips = _trip_count(rest, computations, by_name)
                unknown += trips is None
                trips = 1 if trips is None else trips
            for group in _CALLED.findall(rest):
                calls[name] += [(callee, trips) for callee in _NAME.findall(group)]
    postorder, visited = [], {entry}
    stack = [(entry, iter(calls.get(entry, ())))]
    while stack:  # iterative depth-first search: HLO call graphs can be deep
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            postorder.append(node)
            stack.pop()
        elif child[0] not in visited:
            visited.add(child[0])
            stack.append((child[0], iter(calls.get(child[0], ()))))
    multiplier = defaultdict(int, {entry: 1})
    for name in reversed(postorder):  # callers before callees
        for callee, trips in calls.get(name, ()):
            multiplier[callee] += multiplier[name] * trips
    return multiplier, unknown


def collectives(hlo_text: str, num_devices: int) -> Report:
    """Count and bytes per step of each collective kind in an optimized HLO module (`compiled.as_text()`)
    compiled for `num_devices` devices."""
    entry, computations, by_name = _parse(hlo_text)
    multipliers, unknown = _call_multipliers(entry, computations, by_name)
    reduce_scatter_bodies = {match.group(1) for body in computations.values() for _, _, opcode, rest in body
                             if opcode == "fusion" and (match := _REDUCE_SCATTER_FUSION.search(rest))}
    # channel (or instruction name) -> (kind, bytes, wire bytes, executions per step at its outermost placement)
    found: dict[str, tuple[str, int, int, int]] = {}
    for computation, times in multipliers.items():
        for name, shape, opcode, rest in computations.get(computation, ()):
            kind = opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            if kind == "all-reduce" and computation in reduce_scatter_bodies:
                kind = "reduce-scatter"
            operands = sum(shape_bytes(by_name.get(o, ("",))[0]) for o in _NAME.findall(_operands(rest)))
            # An all-gather moves its result; an async start's result is (operands, result).
            size = (shape_bytes(shape) - (operands if kind != opcode else 0)) if kind == "all-gather" else operands
            channel = re.search(r"channel_id=(\d+)", rest)
            key = f"channel {channel.group(1)}" if channel else name
            previous = found.get(key)
            wire = ring_wire_bytes(kind, size, group_size(rest, num_devices))
            found[key] = (kind, size, wire, times if previous is None else min(times, previous[3]))
    counts: dict[str, int] = defaultdict(int)
    moved: dict[str, int] = defaultdict(int)
    sent: dict[str, int] = defaultdict(int)
    for kind, size, wire, times in found.values():
        counts[kind] += times
        moved[kind] += times * size
        sent[kind] += times * wire
    return Report({kind: Collective(kind, counts[kind], moved[kind], sent[kind]) for kind in KINDS if counts[kind]},
                  unknown)
