"""Every row accounted for: each row read is written, rejected (file, line, reason) or counted as a duplicate.

``RowAccount`` holds the counts and checks the identity ``read = written + rejected + duplicates``. A command that
drops rows for another reason extends it with a field of its own and names it in ``OUTCOMES`` (``data clean`` adds
``removed``), so the identity and the summary line follow::

    @dataclass
    class CleanAccount(RowAccount):
        removed: int = 0
        OUTCOMES: ClassVar[tuple[str, ...]] = (*RowAccount.OUTCOMES, "removed")

The counts are of rows, not records: a row that gives several records (PsyQA with ``answers=all``) is one row
written. A broken identity is a bug in zhiling, never in the data, so it raises ``AccountingError``, which is not a
``ZhilingError`` and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class AccountingError(RuntimeError):
    """Rows went missing (or were counted twice) between reading and writing: a bug in zhiling."""


@dataclass
class RowAccount:
    read: int = 0
    written: int = 0
    rejected: int = 0
    duplicates: int = 0

    OUTCOMES: ClassVar[tuple[str, ...]] = ("written", "rejected", "duplicates")

    @property
    def accounted(self) -> int:
        """Rows with an outcome (the sum of the ``OUTCOMES`` counts)."""
        return sum(getattr(self, name) for name in self.OUTCOMES)

    def check(self) -> None:
        """Raise ``AccountingError`` unless every row read has exactly one outcome."""
        if self.read != self.accounted:
            raise AccountingError(f"internal error: {self.read} rows read but {self.accounted} accounted for "
                                  f"({self.equation()}); please report this")

    def equation(self) -> str:
        """``10 rows read = 7 written + 2 rejected + 1 duplicates``."""
        parts = " + ".join(f"{getattr(self, name)} {name}" for name in self.OUTCOMES)
        return f"{self.read} rows read = {parts}"
