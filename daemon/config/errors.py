"""ConfigError: the one exception for a bad configuration, raised with every problem found."""

from __future__ import annotations


class ConfigError(Exception):
    """One or more configuration problems, each naming its key path and line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
