"""A document filter: one method, ``reason``; the ``filter`` stage does the bookkeeping."""
from dataclasses import dataclass, field
from typing import Any

from recipe_engine import DocumentFilter, Problems


@dataclass(kw_only=True)
class NoTodo(DocumentFilter, name="no_todo", version="1"):
    """Drop documents with more than max_todos TODO/FIXME markers."""

    max_todos: int = 5
    markers: list[str] = field(default_factory=lambda: ["TODO", "FIXME"])

    def check(self, problems: Problems) -> None:
        problems.require(self.max_todos >= 0, "max_todos", f"must be >= 0, got {self.max_todos}")

    def reason(self, doc: dict[str, Any]) -> str | None:
        found = sum(doc["text"].count(m) for m in self.markers)
        return "too_many_todos" if found > self.max_todos else None
