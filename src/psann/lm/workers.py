"""Process pools for CPU-bound text work (BPE pre-tokenisation, dataset builds)."""

from __future__ import annotations

import multiprocessing as mp


def process_context():
    """fork where the platform has it: workers start in milliseconds and callers need no
    ``if __name__ == "__main__"`` guard (the workers only run text code, never torch)."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
