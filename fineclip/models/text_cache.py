"""Cache of text embeddings for a frozen text tower: a caption already seen is never re-encoded."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class TextEmbeddingCache:
    """Maps caption string -> normalised embedding (detached, on the device it was computed on)."""

    def __init__(self) -> None:
        self._store: dict[str, torch.Tensor] = {}
        self.encoded = 0  # number of captions actually sent through the text tower

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def lookup(self, texts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Embeddings of ``texts`` (N, D); the unseen ones are encoded together in one call."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._store))
        if missing:
            with torch.no_grad():
                fresh = encode(missing).detach()
            self._store.update(zip(missing, fresh, strict=True))
            self.encoded += len(missing)
        return torch.stack([self._store[t] for t in texts])
