"""Stage graph ordering."""
from __future__ import annotations


def topological_order(nodes: list[str], edges: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """Order ``nodes`` so every node comes after the nodes it depends on (``edges[n]``),
    keeping declaration order among independent nodes. Returns (order, cycle); ``cycle`` is
    empty unless the graph has one, in which case it is one cycle's path."""
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(nodes):
        ready = [n for n in nodes if n not in done and all(d in done for d in edges.get(n, []))]
        if not ready:
            return order, _find_cycle([n for n in nodes if n not in done], edges)
        order.append(ready[0])
        done.add(ready[0])
    return order, []


def _find_cycle(nodes: list[str], edges: dict[str, list[str]]) -> list[str]:
    node, path = nodes[0], []
    remaining = set(nodes)
    while node not in path:
        path.append(node)
        node = next(d for d in edges.get(node, []) if d in remaining)
    return path[path.index(node):]
