"""Where the KV memory goes, by kind: the figures that separate paging from contiguous reservation.

Every slot of the cache is in exactly one of five states at a given moment:

* **stored**: it holds the K/V of a token some live sequence has computed
  (a page shared by several sequences counts once);
* **internal fragmentation**: an empty slot in a page that already holds
  tokens: with paging only the last page of a sequence has any;
* **reservation waste**: a slot set aside for tokens not generated yet: the
  rest of a contiguous reservation, or pages held back by the conservative
  admission policy;
* **external fragmentation**: a free slot that no pending request can use,
  because it lies in a hole smaller than the smallest contiguous reservation
  any waiting request needs (paging has none: any free page serves anyone);
* **free**: everything else, ready for use.

The five fractions sum to one.  ``pages_without_sharing`` counts the pages the
same sequences would hold if no page were shared (prefix hits and forked
siblings each with their own copy), so that sharing's saving can be measured
in the same run.
"""

from __future__ import annotations

from typing import NamedTuple

KINDS = ("stored", "internal_fragmentation", "reservation_waste", "external_fragmentation", "free")


class KVWaste(NamedTuple):  # a tuple: the planner makes one every virtual step, and a frozen dataclass costs 4x
    """One snapshot of the cache, in token slots."""

    total_slots: int
    stored_slots: int
    internal_slots: int
    reserved_slots: int
    external_slots: int
    pages_in_use: int
    pages_without_sharing: int

    @property
    def free_slots(self) -> int:
        return self.total_slots - self.stored_slots - self.internal_slots - self.reserved_slots - self.external_slots

    def fractions(self) -> dict[str, float]:
        """Each of the five states' share of the cache, by name (KINDS)."""
        return dict(zip(KINDS, self.fraction_values()))

    def fraction_values(self) -> tuple[float, float, float, float, float]:
        """The same shares as a tuple in KINDS's order: what a per-step accumulator wants, without a dict."""
        total = self.total_slots
        return (self.stored_slots / total, self.internal_slots / total, self.reserved_slots / total,
                self.external_slots / total, self.free_slots / total)

    @property
    def waste_fraction(self) -> float:
        """Memory held but not storing tokens, plus memory nobody can use: the three kinds of waste."""
        return (self.internal_slots + self.reserved_slots + self.external_slots) / self.total_slots

    @property
    def sharing_saving(self) -> float:
        """Fraction of pages that sharing saves right now (0 when nothing is shared or nothing is held)."""
        if self.pages_without_sharing == 0:
            return 0.0
        return 1.0 - self.pages_in_use / self.pages_without_sharing
