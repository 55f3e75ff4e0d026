"""A job's op graph laid out for an SVG drawn on the server: ops in columns by their
upstream depth (an op with no upstream in column 0, else one right of its deepest
upstream), rows in the job's own order. Pure: no I/O, no page code."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.messages import OpInfo

NODE_WIDTH = 180
NODE_HEIGHT = 40
COLUMN_GAP = 70
ROW_GAP = 18
MARGIN = 12
LABEL_CHARS = 22


@dataclass(frozen=True)
class Node:
    name: str
    label: str  # the name, shortened to fit the box (the full name is in its title)
    column: int
    row: int
    x: int
    y: int
    tags: dict[str, str]


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: str  # an SVG path: a curve from the source's right side to the target's left


@dataclass(frozen=True)
class OpGraph:
    nodes: list[Node]
    edges: list[Edge]
    width: int
    height: int


def op_depths(ops: list[OpInfo]) -> dict[str, int]:
    """Each op's column: 0 without upstream ops, else 1 + its deepest upstream's.
    Upstream names the job does not define are ignored; a cycle (which the SDK does not
    build) is cut where it is met rather than looping."""
    upstream = {op.name: [u for u in op.upstream if u != op.name] for op in ops}
    depths: dict[str, int] = {}

    def depth(name: str, seen: frozenset[str]) -> int:
        if name in depths:
            return depths[name]
        parents = [u for u in upstream.get(name, []) if u in upstream and u not in seen]
        found = 1 + max((depth(u, seen | {name}) for u in parents), default=-1)
        depths[name] = found
        return found

    for op in ops:
        depth(op.name, frozenset())
    return depths


def layout(ops: list[OpInfo]) -> OpGraph:
    """Boxes and curves for `ops`, sized for a viewBox of (width, height)."""
    depths = op_depths(ops)
    rows_used: dict[int, int] = {}
    nodes: dict[str, Node] = {}
    for op in ops:
        column = depths[op.name]
        row = rows_used.get(column, 0)
        rows_used[column] = row + 1
        nodes[op.name] = Node(
            name=op.name,
            label=op.name if len(op.name) <= LABEL_CHARS else op.name[: LABEL_CHARS - 1] + "…",
            column=column,
            row=row,
            x=MARGIN + column * (NODE_WIDTH + COLUMN_GAP),
            y=MARGIN + row * (NODE_HEIGHT + ROW_GAP),
            tags=op.tags,
        )
    edges = [
        _edge(nodes[u], nodes[op.name])
        for op in ops
        for u in dict.fromkeys(op.upstream)
        if u in nodes and u != op.name
    ]
    columns = max(depths.values(), default=-1) + 1
    rows = max(rows_used.values(), default=0)
    return OpGraph(
        nodes=list(nodes.values()),
        edges=edges,
        width=2 * MARGIN + columns * NODE_WIDTH + max(columns - 1, 0) * COLUMN_GAP,
        height=2 * MARGIN + rows * NODE_HEIGHT + max(rows - 1, 0) * ROW_GAP,
    )


def _edge(source: Node, target: Node) -> Edge:
    x1, y1 = source.x + NODE_WIDTH, source.y + NODE_HEIGHT // 2
    x2, y2 = target.x, target.y + NODE_HEIGHT // 2
    bend = (x2 - x1) // 2
    path = f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
    return Edge(source.name, target.name, path)
