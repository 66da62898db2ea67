"""The serving engine: one model shared by every request through a scheduler thread.

Causal models with a plain KV cache (transformer, respsann, byte) get continuous batching: a
request joins the running batch at the next step (its prompt prefilled alone into a free slot),
decodes one token per step with the others, and leaves when done. Every decode step runs all
`slots` rows, each slot's keys in columns [0, n) of its own cache row and the step's token in the
last column, the rest masked: the shapes and a row's data do not depend on the other rows, so a
greedy response equals the request's result when it is alone, bit for bit. The price: an idle
slot costs as much as a busy one.

Other models (H-Net, WaveResNet, HGRN keep recurrent state; diffusion fills canvases) run one
request at a time through the objective's own sampler.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import GenerateConfig
from ..infer.generate import IncrementalText, cut_at_stop
from ..objectives import objective_for
from ..objectives.causal import choose_next

log = logging.getLogger("psann.lm")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue holds `max_queue` requests."""


@dataclass
class Job:
    """One sequence to generate. `on_text(text)` gets the text so far as it grows (from the
    engine thread); `on_done(text, finish_reason, completion_tokens)` once at the end."""

    prompt: list[int]
    gen: GenerateConfig
    stop_ids: frozenset[int]
    on_text: Callable[[str], None]
    on_done: Callable[[str, str, int], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    generator: torch.Generator | None = None
    tokenizer: object = None  # set by Engine.submit
    decoded: IncrementalText | None = None

    def add(self, token: int, eos_id: int | None) -> str | None:
        """Take the next token; -> the finish reason when the job ends with it ("stop", "length")."""
        if token == eos_id or token in self.stop_ids:
            return "stop"
        self.ids.append(token)
        text = self._decode()
        cut = cut_at_stop(text, self.gen.stop)
        if cut != text:
            self.text = cut
            return "stop"
        self.text = text
        self.on_text(text)
        return "length" if len(self.ids) >= self.gen.max_new_tokens else None

    def _decode(self) -> str:
        if self.decoded is None:
            self.decoded = IncrementalText(self.tokenizer)  # skips special tokens, as generation does
        return self.decoded.text(self.ids)


class SlotCache:
    """Looks like a KVCache to the attention layers: `slots` rows, each its own sequence. Row b
    keeps its history in columns [0, n_b); a forward with one token per row writes that token's
    keys into the last column and reads the whole width (the model masks columns n_b .. width - 2);
    `commit(rows, lengths)` then files the last column at each row's length."""

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, head_dim: int, width: int, device, dtype):
        shape = (n_layers, slots, n_kv_heads, width, head_dim)
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.length, self.max_len, self.states = width - 1, width, {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer, :, :, -1:] = k
        self.v[layer, :, :, -1:] = v
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        pass  # each row's length is the engine's, committed per row

    def commit(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        # the target indexes as (rows, layers, heads, dim): advanced indices split by a slice go first
        self.k[:, rows, :, lengths] = self.k[:, rows, :, -1].transpose(0, 1)
        self.v[:, rows, :, lengths] = self.v[:, rows, :, -1].transpose(0, 1)

    def fill(self, slot: int, cache) -> int:
        """Copy a one-row prefill cache into `slot`; -> its length."""
        n = cache.length
        self.k[:, slot, :, :n] = cache.k[:, 0, :, :n]
        self.v[:, slot, :, :n] = cache.v[:, 0, :, :n]
        return n


class Engine:
    """The scheduler thread. `submit(job)` queues a job (QueueFull when `max_queue` are waiting);
    `close()` stops the thread, ending unfinished jobs with finish reason "cancelled"."""

    def __init__(self, model, tokenizer, model_config, *, slots: int = 8, max_queue: int = 64):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model_config
        self.objective = objective_for(model_config)
        self.slots, self.max_queue = slots, max_queue
        self.device = next(model.parameters()).device
        self.batched = self.objective.exact_likelihood and self._plain_kv_cache()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}
        self._wake = threading.Condition()
        self._running = True
        if self.batched:
            p = next(model.parameters())
            self.cache = SlotCache(model_config.n_layers, slots, model_config.kv_heads, model_config.head_dim,
                                   model_config.max_seq_len, p.device, p.dtype)
            self.lengths = torch.zeros(slots, dtype=torch.long, device=self.device)
            self.next_input = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._thread = threading.Thread(target=self._loop, name="psann-serve-engine", daemon=True)
        self._thread.start()

    @torch.no_grad()
    def _plain_kv_cache(self) -> bool:
        """Whether the model's cache is keys and values only (no recurrent state per row)."""
        try:
            cache = self.model.new_cache(1, 2)
            self.model(torch.zeros(1, 1, dtype=torch.long, device=self.device), cache=cache, last_only=True)
        except (AttributeError, TypeError, NotImplementedError):
            return False
        return hasattr(cache, "k") and not getattr(cache, "states", None) and hasattr(self.config, "kv_heads")

    @property
    def busy(self) -> int:
        with self._wake:
            return len(self._active) + len(self._waiting)

    def submit(self, job: Job) -> None:
        job.tokenizer = self.tokenizer
        if job.gen.seed is not None:
            job.generator = torch.Generator(device=self.device).manual_seed(job.gen.seed)
        with self._wake:
            if not self._running:
                raise QueueFull("the server is shutting down")
            free = self.slots - len(self._active) if self.batched else 0
            if len(self._waiting) >= self.max_queue + max(0, free):
                raise QueueFull(f"{self.busy} requests are running or waiting (the queue holds {self.max_queue})")
            self._waiting.append(job)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        self._thread.join(timeout=30)
        for job in [*self._active.values(), *self._waiting]:
            job.on_done(job.text, "cancelled", len(job.ids))

    # -- the thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._waiting and not self._active:
                    self._wake.wait()
                if not self._running:
                    return
            try:
                self._step() if self.batched else self._run_one()
            except Exception as exc:  # a bug or an out-of-memory: fail the jobs in hand, keep serving
                log.exception("serve: generation failed")
                with self._wake:
                    jobs = list(self._active.values())
                    self._active.clear()
                for job in jobs:
                    job.on_done(job.text, f"error: {type(exc).__name__}: {exc}", len(job.ids))

    def _take(self) -> Job | None:
        with self._wake:
            while self._waiting:
                job = self._waiting.popleft()
                if not job.cancelled.is_set():
                    return job
                job.on_done(job.text, "cancelled", 0)
        return None

    def _finish(self, slot: int, job: Job, reason: str) -> None:
        with self._wake:
            self._active.pop(slot, None)
        job.on_done(job.text, reason, len(job.ids))

    def _choose(self, job: Job, logits: torch.Tensor) -> int:
        gen = job.gen
        return int(choose_next(logits[None].float(), temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                               generator=job.generator))

    def _step(self) -> None:
        """Admit waiting jobs into free slots (each prefilled alone), then one decode step for all."""
        while len(self._active) < self.slots:
            job = self._take()
            if job is None:
                break
            slot = next(s for s in range(self.slots) if s not in self._active)
            with self._wake:
                self._active[slot] = job
            prefill = self.model.new_cache(1, self.config.max_seq_len)
            logits = self.model(torch.tensor([job.prompt], device=self.device), cache=prefill, last_only=True)[0, -1]
            self.lengths[slot] = self.cache.fill(slot, prefill)
            self._deliver(slot, job, self._choose(job, logits))
        for slot, job in list(self._active.items()):
            if job.cancelled.is_set():
                self._finish(slot, job, "cancelled")
        if not self._active:
            return
        width = self.config.max_seq_len
        columns = torch.arange(width, device=self.device)
        mask = (columns[None, :] < self.lengths[:, None]) | (columns[None, :] == width - 1)
        logits = self.model(self.next_input[:, None], attention_mask=mask.long(), position_ids=self.lengths[:, None],
                            cache=self.cache, last_only=True)[:, -1]
        rows = torch.tensor(sorted(self._active), device=self.device)
        self.cache.commit(rows, self.lengths[rows])
        self.lengths[rows] += 1
        for slot, job in sorted(self._active.items()):
            self._deliver(slot, job, self._choose(job, logits[slot]))

    def _deliver(self, slot: int, job: Job, token: int) -> None:
        reason = job.add(token, self.tokenizer.eos_id)
        if reason is None and int(self.lengths[slot]) + 1 >= self.config.max_seq_len:
            reason = "length"  # the context is full (the request was checked to fit; a safeguard)
        if reason is not None:
            self._finish(slot, job, reason)
        else:
            self.next_input[slot] = token

    def _run_one(self) -> None:
        """A model without a plain KV cache: one job at a time through the objective's sampler."""
        job = self._take()
        if job is None:
            return
        with self._wake:
            self._active[0] = job
        reason = "length"

        def should_stop(row: int, new_ids: list[int]) -> bool:
            nonlocal reason
            if job.cancelled.is_set():
                reason = "cancelled"
                return True
            ended = job.add(new_ids[-1], None)
            if ended == "stop":
                reason = "stop"
            return ended is not None

        new = self.objective.sample(self.model, [job.prompt], job.gen, tokenizer=self.tokenizer,
                                    should_stop=should_stop)[0]
        if not job.ids and new:  # a sampler that fills every position at once (diffusion) reports at the end
            for token in new:
                if job.add(token, self.tokenizer.eos_id) is not None:
                    break
        if len(new) < job.gen.max_new_tokens and reason == "length" and not job.cancelled.is_set():
            reason = "stop"  # it ended at EOS
        self._finish(0, job, reason)
