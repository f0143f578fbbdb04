"""The one protocol every per-slot (per-row) state speaks.

A state holds ``batch_size`` independent rows (sessions or streams), every tensor batch-first (the
Mimi KV window keeps its layer axis first). The backbone's ``LFM2Cache``, the Mimi decoder and
encoder states and the detokenizer's state all implement it, so the engine handles them alike:

* ``reset_rows(rows)``: start rows afresh (others untouched); returns the state;
* ``rows(start, stop)``: a view of a contiguous block of rows: stepping it updates the state in place;
* ``select(rows)``: a new state holding copies of the given rows, in that order;
* ``assign_rows(rows, other)``: overwrite rows with the rows of ``other`` (in order); returns the state;
* ``clone()``: a copy of every row.

``rows`` selectors are index lists or 1-D index tensors.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

from torch import Tensor

S = TypeVar("S", bound="RowState")


@runtime_checkable
class RowState(Protocol):
    @property
    def batch_size(self) -> int: ...

    def reset_rows(self: S, rows: Tensor | list[int]) -> S: ...

    def rows(self: S, start: int, stop: int) -> S: ...

    def select(self: S, rows: Tensor | list[int]) -> S: ...

    def assign_rows(self: S, rows: Tensor | list[int], other: S) -> S: ...

    def clone(self: S) -> S: ...
