"""Sources of prose every installed Python environment carries (being written)."""
from __future__ import annotations

COMPONENTS: list[type] = []
