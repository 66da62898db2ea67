"""Supervised fine-tuning data: prompt/response pairs and chat conversations, as fixed windows
whose loss covers the answers.

A JSONL line is either `{"prompt": ..., "response": ...}` or a conversation
`{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`.
A pair becomes [BOS prompt response EOS]; a conversation is rendered by the tokenizer's chat
template (BOS first) and only the assistant turns (their content and end-of-turn marker) are
targets. Examples are built into token shards with their target flags and read as "examples"
windows (loader.Windows): each cut to max_length + 1 tokens from the right, then padded. Causal
models: other targets and padding are IGNORE_INDEX. Diffusion models (`eos_padding`): the
window is padded with EOS and those EOS count as answer tokens (the model learns where an
answer ends); the objective never masks the rest (see `response_positions`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import DataError
from ..files import jsonl_rows
from ..tokenizers.chat import check_messages, encode_conversation
from .shards import IGNORE_INDEX


Example = tuple[str, str] | list[dict[str, str]]  # a (prompt, response) pair or a conversation


def read_sft_jsonl(paths: list[str | os.PathLike]) -> list[Example]:
    examples: list[Example] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"SFT file not found: {path}. Give JSONL files with one {{\"prompt\", \"response\"}} or "
                            "{\"messages\": [...]} object per line.")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, row in jsonl_rows(lines, path, "write one JSON object per line."):
            if isinstance(row, dict) and "messages" in row:
                try:
                    messages = check_messages(row["messages"])
                except DataError as exc:
                    raise DataError(f"{path}:{number}: {exc}") from exc
                if not any(m["role"] == "assistant" for m in messages):
                    raise DataError(f"{path}:{number}: the conversation has no assistant message to learn from.")
                examples.append(messages)
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
                examples.append((row["prompt"], row["response"]))
            else:
                raise DataError(f"{path}:{number}: each line must be an object with string fields \"prompt\" and "
                                f"\"response\", or a \"messages\" list, got {lines[number - 1][:80]!r}.")
    if not examples:
        raise DataError(f"no prompt/response pairs or conversations in {', '.join(map(str, paths))}.")
    return examples


def example_text(example: Example) -> str:
    """Plain text of an example (to train a tokenizer on), role names included: a tokenizer
    without role tokens spells them out (plain-text template), so they must be in its vocabulary."""
    if isinstance(example, tuple):
        return "\n".join(example)
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in example) + "\nAssistant: "


def encode_example(tok, example: Example) -> tuple[list[int], list[bool]]:
    if isinstance(example, tuple):
        prompt, response = tok.encode(example[0], add_bos=True), tok.encode(example[1], add_eos=True)
        return prompt + response, [False] * len(prompt) + [True] * len(response)
    return encode_conversation(tok, example)


def response_positions(y: torch.Tensor) -> torch.Tensor:
    """(B, L) True where the input x[t] is a response token: its own target slot, y[t-1], is
    scored. The first position (BOS) never is."""
    positions = torch.zeros_like(y, dtype=torch.bool)
    positions[:, 1:] = y[:, :-1] != IGNORE_INDEX
    return positions
