"""Counting skipped samples across DataLoader workers, the same way for every loop.

A dataset cannot raise across DataLoader workers in a way the loop can count, so a sample that cannot be
used (unreadable media, too long, no supervised tokens, a processor error) is logged where it happens and
travels as a record `{"file", "index", "id", "reason"}` inside the Example that replaced it; the collators
concatenate these into `batch["skipped"]`. The loop owns one `SkipLedger` per run:

    ledger = SkipLedger(cfg.data.max_bad_fraction, len(train_dataset))
    for batch in loader:
        ledger.add(batch.pop("skipped"))       # raises TooManySkips past the limit
    summary["skipped"] = ledger.summary()

A sample is counted once however many epochs skip it again: the ledger keys records by (file, index).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
SUMMARY_RECORDS = 100  # records listed in summary(); the count covers all of them
MESSAGE_EXAMPLES = 3
MAX_REASON_CHARS = 300  # ids and reasons quoted in the TooManySkips message


class TooManySkips(ValueError):
    """More samples were skipped than data.max_bad_fraction allows; the message lists the first few."""


def skip_record(file: str, index: int, sample_id: str, reason: str) -> dict:
    """The one shape of a skip record (what `batch["skipped"]` holds), logged as it is made.

    The reason is kept to one line of at most `MAX_REASON_CHARS` (processor errors can be long).
    """
    reason = " ".join(reason.split())
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    log.warning("skipped %s: sample %d (id=%r): %s", file, index, sample_id, reason)
    return {"file": file, "index": index, "id": sample_id, "reason": reason}


class SkipLedger:
    """Distinct skipped samples of one run; raises `TooManySkips` once they exceed the allowed fraction."""

    def __init__(self, max_bad_fraction: float, num_samples: int):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be within [0, 1], got {max_bad_fraction}")
        if num_samples < 1:
            raise ValueError(f"SkipLedger needs the dataset's sample count (>= 1), got {num_samples}")
        self.max_bad_fraction = max_bad_fraction
        self.num_samples = num_samples
        self._records: dict[tuple[str, int], dict] = {}

    @property
    def limit(self) -> float:
        return self.max_bad_fraction * self.num_samples

    @property
    def count(self) -> int:
        return len(self._records)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self._records.values()]

    def add(self, records: list[dict]) -> None:
        """Count `records` (already logged where they were made); raise once the count exceeds the limit."""
        for record in records:
            self._records.setdefault((record["file"], record["index"]), record)
        if self.count > self.limit:
            first = "; ".join(f"{r['id']!r}: {r['reason']}" for r in list(self._records.values())[:MESSAGE_EXAMPLES])
            raise TooManySkips(
                f"{self.count} of {self.num_samples} samples skipped ({self.count / self.num_samples:.1%}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction} allows; first: {first}"
            )

    def summary(self) -> dict:
        """For summary.json: the count, the fraction and the first `SUMMARY_RECORDS` records."""
        return {
            "num_skipped": self.count,
            "fraction": self.count / self.num_samples,
            "max_bad_fraction": self.max_bad_fraction,
            "num_samples": self.num_samples,
            "records": list(self._records.values())[:SUMMARY_RECORDS],
        }
