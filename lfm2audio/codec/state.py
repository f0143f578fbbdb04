"""Explicit per-stream streaming state of the Mimi codec.

A state is a batch of independent streams (the ``lfm2audio.row_state`` protocol): every tensor has the
batch (row) dimension,
and ``MimiCodec.decode_step`` / ``encode_step`` advance all rows by one frame, updating
the tensors in place (nothing is reallocated between frames). A server keeps one state
for all its sessions and

* ``reset_rows(rows)`` when a row starts a new stream (or its stream is reset),
* ``select(rows)`` to drop finished rows (compaction) or reorder them,
* ``MimiDecoderState.cat([...])`` to add rows (e.g. ``codec.decoder_state(1)``),
* ``assign_rows(rows, sub)`` to write back rows stepped in a sub-batch (``sub = select(rows)``)
  when only some streams have a frame this step,
* ``clone()`` to keep a copy (steps mutate the state they are given).

``select``/``cat``/``assign_rows`` copy whole rows, KV windows included (about 8 MB per row
for the official Mimi decoder): prefer one long-lived batch and ``reset_rows``.

``rows`` is a bool mask of length ``batch_size``, a list/tensor of indices or one index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .mimi_transformer import KVWindow, RowSelector, rows_to_index


def _zero_rows(tensors: list[Tensor], idx: Tensor) -> None:
    for t in tensors:
        t.index_fill_(0, idx, 0.0)


def _row_views(packed: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Views of ``packed`` (B, N): one per row shape, side by side along N."""
    out, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(packed[:, at : at + n].view(packed.shape[0], *shape))
        at += n
    return out


@dataclass
class MimiDecoderState:
    """Decoder streaming state: upsampler partial outputs, decoder transformer KV window and
    the SEANet decoder's conv tails / transposed-conv partial outputs (traversal order).

    ``upsample`` and ``decoder`` are views of one buffer, ``packed`` (B, N): the upsampler's
    part first, then the SEANet decoder's (``seanet``). Saving, restoring, gathering or
    resetting rows is then one op, not one per tensor (there are a dozen or more). Built
    from separate tensors (``packed`` omitted), the state copies them into a new buffer.
    """

    upsample: Tensor
    transformer: KVWindow
    decoder: list[Tensor]
    packed: Tensor | None = None

    def __post_init__(self) -> None:
        if self.packed is None:
            parts = [self.upsample, *self.decoder]
            B = self.upsample.shape[0]
            self.packed = torch.cat([t.reshape(B, -1) for t in parts], dim=1)
            self.upsample, *self.decoder = _row_views(self.packed, self._shapes())

    def _shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape[1:]) for t in (self.upsample, *self.decoder)]

    def _with_packed(self, packed: Tensor, transformer: KVWindow) -> MimiDecoderState:
        upsample, *decoder = _row_views(packed, self._shapes())
        return MimiDecoderState(upsample, transformer, decoder, packed)

    @property
    def batch_size(self) -> int:
        return self.upsample.shape[0]

    @property
    def seanet(self) -> Tensor:
        """The SEANet decoder's part of ``packed``, (B, N_seanet): a view."""
        assert self.packed is not None
        return self.packed[:, self.upsample[0].numel() :]

    def seanet_views(self, seanet: Tensor) -> list[Tensor]:
        """``decoder``-shaped views of rows laid out as ``seanet`` (e.g. gathered from it)."""
        return _row_views(seanet, self._shapes()[1:])

    def reset_rows(self, rows: RowSelector) -> MimiDecoderState:
        """Restart the given rows from silence; other rows are untouched. Returns ``self``."""
        assert self.packed is not None
        idx = rows_to_index(rows, self.batch_size, self.upsample.device)
        self.packed.index_fill_(0, idx, 0.0)
        self.transformer.reset_rows(idx)
        return self

    def rows(self, start: int, stop: int) -> MimiDecoderState:
        """A view of rows [start, stop): stepping it updates this state in place."""
        assert self.packed is not None
        tr = self.transformer
        window = KVWindow(
            tr.keys[:, start:stop], tr.values[:, start:stop], tr.positions[start:stop], tr.offsets[start:stop]
        )
        return MimiDecoderState(
            self.upsample[start:stop], window, [t[start:stop] for t in self.decoder], self.packed[start:stop]
        )

    def step_tensors(self, seanet: bool = True) -> list[Tensor]:
        """The tensors (batch first) to restore to undo a step of some rows (without
        ``seanet``: of the upsampler and transformer only, ``MimiCodec.decode_latent_chunk``).

        The KV window's keys, values and slot positions need no restoring: a row
        that did not really step only overwrote the slot of its next position,
        which its next real step writes again before attending to it (the
        position that slot held had already left the attention window).
        """
        assert self.packed is not None
        return [self.packed if seanet else self.upsample, self.transformer.offsets]

    def select(self, rows: RowSelector) -> MimiDecoderState:
        """A new state holding only ``rows`` (in that order)."""
        assert self.packed is not None
        idx = rows_to_index(rows, self.batch_size, self.upsample.device)
        return self._with_packed(self.packed.index_select(0, idx), self.transformer.select(idx))

    def assign_rows(self, rows: RowSelector, other: MimiDecoderState) -> MimiDecoderState:
        """Overwrite ``rows`` with the rows of ``other`` (in order), in place. Returns ``self``."""
        assert self.packed is not None and other.packed is not None
        idx = rows_to_index(rows, self.batch_size, self.upsample.device)
        self.packed.index_copy_(0, idx, other.packed)
        self.transformer.assign_rows(idx, other.transformer)
        return self

    def clone(self) -> MimiDecoderState:
        assert self.packed is not None
        return self._with_packed(self.packed.clone(), self.transformer.clone())

    @staticmethod
    def cat(states: list[MimiDecoderState]) -> MimiDecoderState:
        """Concatenate the rows of several states (same codec, device and dtype)."""
        packed = torch.cat([s.packed for s in states if s.packed is not None])
        return states[0]._with_packed(packed, KVWindow.cat([s.transformer for s in states]))


@dataclass
class MimiEncoderState:
    """Encoder streaming state: SEANet encoder conv tails, encoder transformer KV window,
    the downsampler's input tail and ``first`` (B,) bool, true for rows that have not yet
    received audio (the downsampler pads a stream's start with its first latent step)."""

    encoder: list[Tensor]
    transformer: KVWindow
    downsample: Tensor
    first: Tensor

    @property
    def batch_size(self) -> int:
        return self.first.shape[0]

    def _tensors(self) -> list[Tensor]:
        return [*self.encoder, self.downsample]

    def reset_rows(self, rows: RowSelector) -> MimiEncoderState:
        """Restart the given rows; other rows are untouched. Returns ``self``."""
        idx = rows_to_index(rows, self.batch_size, self.first.device)
        _zero_rows(self._tensors(), idx)
        self.first.index_fill_(0, idx, True)
        self.transformer.reset_rows(idx)
        return self

    def rows(self, start: int, stop: int) -> MimiEncoderState:
        """A view of rows [start, stop): stepping it updates this state in place."""
        tr = self.transformer
        window = KVWindow(
            tr.keys[:, start:stop], tr.values[:, start:stop], tr.positions[start:stop], tr.offsets[start:stop]
        )
        return MimiEncoderState(
            [t[start:stop] for t in self.encoder], window, self.downsample[start:stop], self.first[start:stop]
        )

    def select(self, rows: RowSelector) -> MimiEncoderState:
        idx = rows_to_index(rows, self.batch_size, self.first.device)
        return MimiEncoderState(
            [t.index_select(0, idx) for t in self.encoder],
            self.transformer.select(idx),
            self.downsample.index_select(0, idx),
            self.first.index_select(0, idx),
        )

    def assign_rows(self, rows: RowSelector, other: MimiEncoderState) -> MimiEncoderState:
        """Overwrite ``rows`` with the rows of ``other`` (in order), in place. Returns ``self``."""
        idx = rows_to_index(rows, self.batch_size, self.first.device)
        for dst, src in zip(self._tensors(), other._tensors(), strict=True):
            dst.index_copy_(0, idx, src)
        self.first.index_copy_(0, idx, other.first)
        self.transformer.assign_rows(idx, other.transformer)
        return self

    def clone(self) -> MimiEncoderState:
        return MimiEncoderState(
            [t.clone() for t in self.encoder], self.transformer.clone(), self.downsample.clone(), self.first.clone()
        )

    @staticmethod
    def cat(states: list[MimiEncoderState]) -> MimiEncoderState:
        return MimiEncoderState(
            [torch.cat(ts) for ts in zip(*(s.encoder for s in states), strict=True)],
            KVWindow.cat([s.transformer for s in states]),
            torch.cat([s.downsample for s in states]),
            torch.cat([s.first for s in states]),
        )
