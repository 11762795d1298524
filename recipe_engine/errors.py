"""The one error type users see, and the warning category for ignored options."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


class RecipeWarning(UserWarning):
    """An option was clamped, replaced or ignored; tests turn these into errors."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Tell the user an option was clamped, replaced or ignored (a ``RecipeWarning``)."""
    import warnings

    warnings.warn(message, RecipeWarning, stacklevel=stacklevel + 1)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where it is (file and dotted key) and what to do."""

    key: str
    message: str
    file: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.key}: {self.message}"


class RecipeError(Exception):
    """A user or recipe mistake. Carries every problem found, not just the first."""

    def __init__(self, problems: Problem | str | Iterable[Problem]):
        if isinstance(problems, str):
            problems = [Problem(key="recipe", message=problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems in the recipe:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class StageError(Exception):
    """A stage failed while running (bad data past its threshold, a library error, ...)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
