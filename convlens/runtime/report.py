"""What a run did that the user should know: lossy steps with their measured error."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LossyEvent:
    """One lossy action taken under a policy.

    ``max_rel_error``: the largest relative change of the dequantized values it caused;
    ``naive_rel_error``: what keeping the common scale without compensating would have cost
    (vLLM's behaviour for NVFP4 weight_scale_2), for comparison."""

    rule: str
    role: str
    keys: tuple[str, ...]
    action: str
    detail: str
    max_rel_error: float
    naive_rel_error: float | None = None

    def __str__(self) -> str:
        naive = (f"; without compensation it would be {self.naive_rel_error:.3g}"
                 if self.naive_rel_error is not None else "")
        what = "change" if self.action.startswith("reconcile") else "error"
        return (f"{self.action} {self.role} of {', '.join(self.keys[:3])}"
                f"{' ...' if len(self.keys) > 3 else ''} ({self.rule}): {self.detail}; max "
                f"relative {what} {self.max_rel_error:.3g}{naive}")


@dataclass
class RunReport:
    lossy: list[LossyEvent] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [str(e) for e in self.lossy]
