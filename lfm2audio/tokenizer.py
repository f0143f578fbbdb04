"""Text tokenizer: the checkpoint's tokenizer.json through the ``tokenizers`` library."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, overload

import torch
from tokenizers import Tokenizer
from torch import Tensor

Ids = Tensor | int | list[int]


class TextTokenizer:
    """The subset of a transformers tokenizer that LFM2-Audio code uses.

    ``encode`` / ``decode`` take the same arguments as transformers' so scripts
    written for liquid-audio keep working (``processor.text.decode(t)``).
    """

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str = "<|startoftext|>", eos_token: str = "<|im_end|>"):
        self._tok = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token)
        self.eos_token_id = tokenizer.token_to_id(eos_token)
        self.special_ids = frozenset(
            tokenizer.token_to_id(t.content) for t in tokenizer.get_added_tokens_decoder().values() if t.special
        )

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters: no token covers more of a text than this."""
        if not hasattr(self, "_max_chars"):
            self._max_chars = max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)
        return self._max_chars

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @overload
    def encode(self, text: str, add_special_tokens: bool = ..., return_tensors: None = None) -> list[int]: ...
    @overload
    def encode(self, text: str, add_special_tokens: bool = ..., *, return_tensors: Literal["pt"]) -> Tensor: ...
    @overload
    def encode(self, text: str, add_special_tokens: bool, return_tensors: Literal["pt"]) -> Tensor: ...

    def encode(
        self, text: str, add_special_tokens: bool = True, return_tensors: Literal["pt"] | None = None
    ) -> list[int] | Tensor:
        """Token ids of ``text``; special tokens written in the text are recognised.

        ``add_special_tokens`` prepends <|startoftext|> as LFM2's tokenizer does;
        ``return_tensors="pt"`` gives a (1, N) int64 tensor.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if return_tensors is None:
            return ids
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        return torch.tensor([ids], dtype=torch.long)

    def decode(self, ids: Ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(_as_list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (byte-level BPE), for incremental decoding."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self.special_ids:
            return piece.encode("utf-8")
        return bytes(_BYTE_DECODER.get(ch, 0) for ch in piece)


def _as_list(ids: Ids) -> list[int]:
    if isinstance(ids, Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _byte_level_alphabet() -> dict[str, int]:
    # GPT-2 byte-level BPE maps each byte to a printable character; this inverts that map.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in chars.items()}


_BYTE_DECODER = _byte_level_alphabet()


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that are always whole UTF-8 characters.

    A character split across byte-level tokens is held back until it completes,
    so a client never receives half an emoji or a replacement character.
    """

    def __init__(self, tokenizer: TextTokenizer, *, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip_special = skip_special_tokens
        self._pending = b""

    def push(self, token_id: int) -> str:
        if self.skip_special and token_id in self.tok.special_ids:
            return ""
        data = self._pending + self.tok.id_to_bytes(int(token_id))
        # Keep back an incomplete trailing UTF-8 sequence (at most 3 bytes).
        cut = len(data)
        for back in range(1, min(4, len(data)) + 1):
            byte = data[-back]
            if byte & 0xC0 == 0x80:
                continue
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            if need > back:
                cut = len(data) - back
            break
        self._pending = data[cut:]
        return data[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        data, self._pending = self._pending, b""
        return data.decode("utf-8", errors="replace")
