"""Chat templates: Jinja templates stored with the tokenizer (the Hugging Face convention).

A saved tokenizer directory holds ``tokenizer_config.json`` with a ``chat_template`` key, so the
template travels with every checkpoint and HF tools read it too. Two defaults:

- tokenizers that own the role tokens (BPE tokenizers psann trains reserve them):
  ``<|user|>Hi<|end|><|assistant|>Hello<|end|>``, one id per marker;
- any other tokenizer (byte, char, sentencepiece, external): plain-text roles, each turn ended
  by the EOS token, ``User: Hi</s>Assistant: Hello</s>``.

Templates never emit BOS: as everywhere in psann, the caller adds BOS to a model input. The
rendered text may contain special-token strings; ``encode_rendered`` maps them to their ids for
every backend (some never match specials inside ordinary text).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, DataError
from ..files import write_atomic

CONFIG_FILE = "tokenizer_config.json"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)
ROLES = tuple(ROLE_TOKENS)

ROLE_TOKEN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
PLAIN_TEXT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{{ eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}"
)


def has_chat_tokens(specials: dict[str, int]) -> bool:
    return all(t in specials for t in CHAT_TOKENS)


def default_chat_template(specials: dict[str, int]) -> str:
    return ROLE_TOKEN_TEMPLATE if has_chat_tokens(specials) else PLAIN_TEXT_TEMPLATE


@lru_cache(maxsize=16)
def _compile(template: str):
    # The sandbox is what HF uses too: a template from a downloaded tokenizer cannot reach Python.
    # lazy: jinja2 (~0.1 s) loads only when a template is compiled, not with every tokenizer
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ConfigError(f"chat template does not compile: {exc}. Fix the 'chat_template' in {CONFIG_FILE}.") from exc


def check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)):
        raise DataError("a conversation is a list of {\"role\", \"content\"} messages.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(f"message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": str}}, "
                            f"got {str(m)[:80]!r}.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render(template: str, messages: Sequence[dict], *, add_generation_prompt: bool, variables: dict[str, Any]) -> str:
    from jinja2 import TemplateError  # lazy: as in _compile

    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **variables)
    except TemplateError as exc:
        raise DataError(f"chat template failed on this conversation: {exc}") from exc


def split_specials(text: str, specials: dict[str, int]) -> list[str | int]:
    """Pieces of ``text``: special-token strings as their ids, everything else as text (longest match first)."""
    names = sorted((s for s in specials if s and s in text), key=len, reverse=True)
    pieces: list[str | int] = []
    start = i = 0
    while names and i < len(text):
        hit = next((n for n in names if text.startswith(n, i)), None)
        if hit is None:
            i += 1
            continue
        if i > start:
            pieces.append(text[start:i])
        pieces.append(specials[hit])
        i = start = i + len(hit)
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def read_chat_template(directory: str | os.PathLike) -> str | None:
    """The template of a tokenizer directory: tokenizer_config.json's `chat_template` (a string, or
    HF's list of named templates, of which "default" is used), else HF's chat_template.jinja."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    template = None
    if path.is_file():
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise DataError(f"'{path}' is not a JSON object ({exc}); fix it or delete it to use the default template.") from exc
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise DataError(f"'{path}': chat_template must be a Jinja template string (or a list with a \"default\" one).")
    return template


def write_tokenizer_config(directory: Path, template: str, role_names: dict[str, str]) -> None:
    data = {"chat_template": template, **{f"{role}_token": name for role, name in sorted(role_names.items())}}
    write_atomic(directory / CONFIG_FILE, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def encode_conversation(tok, messages, *, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """BOS + the rendered conversation as ids, and which of them are assistant output.

    Encoded turn by turn: the text each message adds to the rendering is encoded on its own, and
    so is an assistant message's generation prompt, before its content (the target). A chat prompt
    (`add_generation_prompt`: the conversation so far, then the generation prompt) is encoded the
    same way, so the ids a model is asked to continue are exactly the ids it was trained on before
    an answer, whatever the tokenizer merges across turn boundaries."""
    messages = check_messages(messages)
    ids, trainable = [tok.bos_id], [False]
    done = ""

    def append(text: str, target: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise DataError("the chat template renders a conversation differently from its beginning (the text of "
                            "messages[:i] is not a prefix of messages[:i+1]), so turns cannot be located; use a "
                            "template that appends one message at a time.")
        piece = tok.encode_rendered(text[len(done):])
        ids.extend(piece)
        trainable.extend([target] * len(piece))
        done = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            append(tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False), False)
        append(tok.apply_chat_template(messages[:i + 1], tokenize=False), message["role"] == "assistant")
    if add_generation_prompt:
        append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False)
    if ids[1:2] == [tok.bos_id]:  # a template that writes {{ bos_token }} itself (Llama style): one BOS
        del ids[0], trainable[0]
    return ids, trainable
