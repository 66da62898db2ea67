"""Multi-turn chat on a checkpoint: a session that keeps the history inside the context window,
and the terminal loop behind `psannlm chat` / `psannlm generate --interactive`."""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from ..errors import ConfigError, DataError
from ..tokenizers.chat import encode_conversation

HELP = ("commands: /quit  /reset (forget the conversation)  /temp <v>  /topk <n|off>  /topp <v>  /help; "
        "anything else is your message")


class ChatSession:
    """The conversation so far and the sampling settings; `send` returns (and streams) the reply."""

    def __init__(self, lm, system: str | None = None, **options):
        self.lm, self.system = lm, system
        self.settings = lm.generation_settings(**options)
        self.messages: list[dict[str, str]] = []
        self.dropped_turns = 0  # oldest turns left out of the last prompt to fit the context
        self.prompt_tokens = 0  # length of the last prompt

    def reset(self) -> None:
        self.messages, self.dropped_turns, self.prompt_tokens = [], 0, 0

    def set_option(self, name: str, value) -> None:
        self.settings = self.lm.generation_settings(**{**self.settings.to_dict(), name: value})

    def prompt_ids(self) -> list[int]:
        """BOS + the rendered history and the generation prompt, dropping whole turns from the
        oldest (the system message stays) until the reply has room in the context window."""
        tok, context = self.lm.tokenizer, self.lm.model_config.max_seq_len
        budget = max(1, context - self.settings.max_new_tokens)
        head = [{"role": "system", "content": self.system}] if self.system else []
        history = list(self.messages)
        self.dropped_turns = 0
        while True:
            ids, _ = encode_conversation(tok, head + history, add_generation_prompt=True)
            if len(ids) <= budget or len(history) <= 1:
                return ids  # a single message that is still too long is cut from the left by the sampler
            history = history[2:]  # the oldest user turn and its reply
            self.dropped_turns += 1

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add the user's message, generate the assistant's reply, add it to the history."""
        self.messages.append({"role": "user", "content": text})
        stream = (lambda row, so_far: on_text(so_far)) if on_text else None
        prompt = self.prompt_ids()
        self.prompt_tokens = len(prompt)
        reply = self.lm.complete_ids([prompt], self.settings, stop_ids=self.lm.tokenizer.chat_stop_ids,
                                     on_text=stream)[0]
        self.messages.append({"role": "assistant", "content": reply})
        return reply


class _Printer:
    """Streams a growing reply: prints only what is new, holding back a trailing U+FFFD that may
    be half of a multi-byte character still being generated."""

    def __init__(self, out: TextIO):
        self.out, self.shown = out, ""

    def __call__(self, text: str) -> None:
        stable = text.rstrip("\ufffd")
        if stable.startswith(self.shown) and len(stable) > len(self.shown):
            self.out.write(stable[len(self.shown):])
            self.out.flush()
            self.shown = stable

    def finish(self, reply: str) -> None:
        if reply.startswith(self.shown):
            self.out.write(reply[len(self.shown):])
        else:  # a stop string cut what was already shown
            self.out.write(f"\n{reply}")
        self.out.write("\n")
        self.out.flush()


OPTIONS = {"/temp": ("temperature", float), "/topk": ("top_k", int), "/topp": ("top_p", float)}


def _command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a /command; False means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        out.write("(conversation cleared)\n")
    elif name == "/help":
        out.write(HELP + "\n")
    elif name in OPTIONS:
        key, kind = OPTIONS[name]
        try:
            value = None if name == "/topk" and arg in ("off", "none", "0") else kind(arg)
            session.set_option(key, value)
        except (ValueError, ConfigError) as exc:
            reason = str(exc).replace(f"'generate.{key}'", name)  # named as typed here: /temp, not generate.temperature
            out.write(f"(cannot set {key} to {arg!r}: {reason})\n")
        else:
            out.write(f"({key} = {getattr(session.settings, key)})\n")
    else:
        out.write(f"(unknown command {name}; {HELP})\n")
    return True


def chat_loop(session: ChatSession, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Read messages line by line until /quit or end of input; stream each reply."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD, as in training text, not a traceback
        stdin.reconfigure(errors="replace")
    interactive = stdin.isatty()
    context = session.lm.model_config.max_seq_len
    out.write(f"psann chat: {session.lm.model_config.base} model, {context}-token context. {HELP}\n")
    out.flush()
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        if not line:  # end of input
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, out):
                return 0
            continue
        out.write("assistant> ")
        out.flush()
        printer, before = _Printer(out), len(session.messages)
        try:
            reply = session.send(line, on_text=printer)
        except DataError as exc:
            out.write(f"\n(error: {exc})\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            del session.messages[before:]
            out.write("\n(reply interrupted and dropped from the history)\n")
            continue
        printer.finish(reply)
        if session.dropped_turns:
            out.write(f"(the {session.dropped_turns} oldest turn(s) no longer fit in the context and were left out)\n")
