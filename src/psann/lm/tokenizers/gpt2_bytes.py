"""GPT-2's printable byte <-> unicode table, used by vocab.json / merges.txt / tokenizer.json."""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> one printable character, as in GPT-2's vocab/merges files.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
    bytes (controls, space, ...) take characters from U+0100 upwards, in byte order.
    """
    keep = set(range(ord("!"), ord("~") + 1))
    keep |= set(range(ord("¡"), ord("¬") + 1))
    keep |= set(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def token_to_str(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def str_to_token(text: str) -> bytes | None:
    """Inverse of :func:`token_to_str`; None when ``text`` has a character outside the table."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in text)
    except KeyError:
        return None
