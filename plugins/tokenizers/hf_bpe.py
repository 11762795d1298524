"""A byte-level BPE tokenizer built on Hugging Face ``tokenizers`` (being written)."""
from __future__ import annotations

COMPONENTS: list[type] = []
