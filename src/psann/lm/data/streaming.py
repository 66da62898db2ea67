"""Training windows straight from text not yet tokenised (tokenised on the fly; memory stays at
one buffer): `StreamingLMDataset` over text shards listed in a manifest, `HFTextStreamingLMDataset`
over a streamed Hugging Face dataset (with a cap on the rows read). Both take the build's
document filters."""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch

from .filters import FilterConfig, TextFilter
from .sources import iter_documents_from, iter_hf_documents, resolve_inputs
from .text import resolve_separator


class StreamingLMDataset(torch.utils.data.IterableDataset):
    """Yields (x, y) LongTensor pairs of `max_length` tokens (y = x shifted by one) from packed
    documents (BOS doc EOS ...). Files are dealt out across data-parallel ranks and DataLoader
    workers (file i goes to share i mod shares), so no two readers see the same text.

    `filters` removes documents as `psannlm data build` does (each reader deduplicates the
    documents it reads); `removed` counts them per filter once a pass is done."""

    def __init__(self, manifest: str | None, tokenizer, max_length: int, *, separator: str | None = None,
                 text_key: str = "text", rank: int = 0, world_size: int = 1, filters: FilterConfig | None = None):
        self.files = resolve_inputs([], [manifest]) if manifest is not None else []
        self.tokenizer, self.max_length = tokenizer, max_length
        self.separator, self.text_key = resolve_separator(separator), text_key
        self.rank, self.world_size = rank, world_size
        self.filters = filters
        self.removed: dict[str, int] = {}

    def _share(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _documents(self):
        share, shares = self._share()
        mine = [f for i, f in enumerate(self.files) if i % shares == share]
        return (doc for _, doc in iter_documents_from(mine, separator=self.separator, text_key=self.text_key))

    def __iter__(self):
        keep = TextFilter(self.filters) if self.filters is not None else None
        span, buffer = self.max_length + 1, np.zeros(0, dtype=np.int64)
        for doc in self._documents():
            if keep is not None and keep(doc) is not None:
                continue
            ids = np.asarray(self.tokenizer.encode(doc, add_bos=True, add_eos=True), dtype=np.int64)
            buffer = np.concatenate([buffer, ids])
            while buffer.shape[0] >= span:
                window = torch.from_numpy(buffer[:span].copy())
                buffer = buffer[span - 1:]  # windows overlap by one token: every token is a target once
                yield window[:-1], window[1:]
        if keep is not None:
            self.removed = {k: v for k, v in keep.removed.items() if v}


class HFTextStreamingLMDataset(StreamingLMDataset):
    """The same windows from a Hugging Face dataset streamed row by row (a hub name, read through
    the local cache offline, or a local dataset directory). Rows are dealt out across readers (row
    i goes to share i mod shares); `max_samples` caps the rows read, over all readers together."""

    def __init__(self, name: str, tokenizer, max_length: int, *, split: str = "train", config_name: str | None = None,
                 text_key: str = "text", rank: int = 0, world_size: int = 1, filters: FilterConfig | None = None,
                 max_samples: int | None = None):
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples={max_samples} must be at least 1 (or None for no cap).")
        super().__init__(None, tokenizer, max_length, text_key=text_key, rank=rank, world_size=world_size,
                         filters=filters)
        self.name, self.split, self.config_name, self.max_samples = name, split, config_name, max_samples

    def _documents(self):
        share, shares = self._share()
        rows = islice(iter_hf_documents(self.name, self.split, self.text_key, self.config_name), self.max_samples)
        return (text.strip() for i, text in enumerate(rows) if i % shares == share and text.strip())
