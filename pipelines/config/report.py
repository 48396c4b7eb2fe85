"""``report``: what the report of a finished run shows."""

from __future__ import annotations

from dataclasses import dataclass

from shardsmith.errors import ConfigError


@dataclass
class ReportConfig:
    output: str = ""  # the OUTPUT folder of a finished run
    per_grid: int = 16  # samples per grid (generated images: twice that)

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("output: the OUTPUT folder of a finished run is required")
        if self.per_grid < 1:
            raise ConfigError(f"per_grid: must be >= 1, got {self.per_grid}")
