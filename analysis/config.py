"""What the analysis of a study draws beside its own results (an experiment's `analysis` section)."""

from __future__ import annotations

from dataclasses import dataclass

REFERENCES = ("", "dit-table4")


@dataclass(frozen=True)
class AnalysisConfig:
    reference: str = ""  # published results overlaid on FID vs Gflops: "dit-table4" (the paper's Table 4) or ""

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"analysis.reference must be one of {REFERENCES}, got {self.reference!r}")
