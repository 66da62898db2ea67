"""`StreamingLMDataset`: training windows straight from text shards listed in a manifest, for
corpora not yet tokenised (tokenised on the fly; memory stays at one buffer)."""

from __future__ import annotations

import numpy as np
import torch

from .sources import iter_documents_from, resolve_inputs
from .text import resolve_separator


class StreamingLMDataset(torch.utils.data.IterableDataset):
    """Yields (x, y) LongTensor pairs of `max_length` tokens (y = x shifted by one) from packed
    documents (BOS doc EOS ...). Files are dealt out across data-parallel ranks and DataLoader
    workers (file i goes to share i mod shares), so no two readers see the same text."""

    def __init__(self, manifest: str, tokenizer, max_length: int, *, separator: str | None = None,
                 text_key: str = "text", rank: int = 0, world_size: int = 1):
        self.files = resolve_inputs([], [manifest])
        self.tokenizer, self.max_length = tokenizer, max_length
        self.separator, self.text_key = resolve_separator(separator), text_key
        self.rank, self.world_size = rank, world_size

    def _my_files(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        share, shares = self.rank * workers + worker, self.world_size * workers
        return [f for i, f in enumerate(self.files) if i % shares == share]

    def __iter__(self):
        span, buffer = self.max_length + 1, np.zeros(0, dtype=np.int64)
        for _, doc in iter_documents_from(self._my_files(), separator=self.separator, text_key=self.text_key):
            ids = np.asarray(self.tokenizer.encode(doc, add_bos=True, add_eos=True), dtype=np.int64)
            buffer = np.concatenate([buffer, ids])
            while buffer.shape[0] >= span:
                window = torch.from_numpy(buffer[:span].copy())
                buffer = buffer[span - 1:]  # windows overlap by one token: every token is a target once
                yield window[:-1], window[1:]
