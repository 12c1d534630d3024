"""Figures measured over several runs: median, spread, and the target each one is held to."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Figure:
    """One measured quantity: a value per run, its unit, and an optional target.

    `meets` decides whether the median meets the target; without it the figure is reported
    without a verdict.
    """

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    target: str = ""
    meets: Callable[[float], bool] | None = None
    decimals: int = 1

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def verdict(self) -> str:
        """Return "yes" or "no" for a figure with a target, else an empty string."""
        if self.meets is None or not self.values:
            return ""
        return "yes" if self.meets(self.median) else "no"

    def format(self, value: float) -> str:
        if math.isinf(value):
            return "timeout"
        return f"{value:,.{self.decimals}f}"

    def spread(self) -> str:
        """Return the range of the runs as `min–max`, or `-` for a single run."""
        if len(self.values) < 2:
            return "-"
        return f"{self.format(min(self.values))}–{self.format(max(self.values))}"


@dataclass
class Section:
    """The figures of one benchmark, with a note on how they were measured."""

    title: str
    method: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: bool = False

    def figure(self, name: str, unit: str, **options) -> Figure:
        """Return the figure called `name`, creating it on first use."""
        for existing in self.figures:
            if existing.name == name:
                return existing
        created = Figure(name, unit, **options)
        self.figures.append(created)
        return created


def percentile(values: list[float], percent: float) -> float:
    """Return the nearest-rank percentile of `values`, or NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(percent / 100 * (len(ordered) - 1))))
    return ordered[index]
