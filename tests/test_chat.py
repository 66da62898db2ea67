"""Chat: templates stored with the tokenizer, SFT on conversations (loss on assistant tokens only),
the chat session and the `psannlm chat` terminal, driven through pipes and a pseudo-terminal."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.data.shards import IGNORE_INDEX
from psann.lm.data.tokens import write_documents
from psann.lm.data.shards import Windows
from psann.lm.data.shards import ShardedTokens
from psann.lm.errors import ConfigError, DataError
from psann.lm.infer.chat import ChatSession
from psann.lm.tokenizers import build_tokenizer, load_tokenizer, tokenizer_fingerprint
from psann.lm.tokenizers.chat import CONFIG_FILE, PLAIN_TEXT_TEMPLATE, ROLE_TOKEN_TEMPLATE, encode_conversation

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Once upon a time there was a little dog who liked the sun. " * 10,
         "What colour is the sky? The sky is blue. Where do fish live? Fish live in water. " * 10]
CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What colour is the sky?"},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Where do fish live?"},
                {"role": "assistant", "content": "In water."}]
FACTS = [("What colour is the sky?", "The sky is blue."), ("Where do fish live?", "Fish live in water."),
         ("What does the dog like?", "The dog likes the sun."), ("Who was there?", "A little dog.")]


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer("bpe", TEXTS, vocab_size=320)


def sft_windows(directory, tok, ids, trainable, max_length, eos_padding):
    """The training windows of one encoded SFT example, as prepared data reads them."""
    write_documents(directory, tok, {"train": [(ids, trainable)]}, masked=True)
    pads = {"pad_id": tok.eos_id, "pad_target": tok.eos_id} if eos_padding else {"pad_id": tok.pad_id}
    return Windows(ShardedTokens(directory), max_length, "examples", **pads)


def test_bpe_tokenizer_reserves_role_tokens_and_renders_them_as_single_ids(bpe):
    assert bpe.chat_template == ROLE_TOKEN_TEMPLATE
    text = bpe.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>Answer briefly.<|end|><|user|>What colour is the sky?<|end|><|assistant|>"
    ids = bpe.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    specials = bpe.special_token_ids
    assert ids[0] == specials["<|system|>"] and ids[-1] == specials["<|assistant|>"]
    assert ids.count(specials["<|end|>"]) == 2 and bpe.chat_stop_ids == {bpe.eos_id, specials["<|end|>"]}
    assert bpe.decode(ids) == text  # the round trip keeps the role tokens
    assert bpe.decode(ids, skip_special_tokens=True) == "Answer briefly.What colour is the sky?"


def test_plain_text_template_for_tokenizers_without_role_tokens():
    byte = build_tokenizer("byte")
    assert byte.chat_template == PLAIN_TEXT_TEMPLATE
    ids = byte.apply_chat_template(CONVERSATION[1:3])
    assert byte.decode(ids, skip_special_tokens=False) == "User: What colour is the sky?<eos>Assistant: Blue.<eos>"
    assert ids.count(byte.eos_id) == 2 and byte.chat_stop_ids == {byte.eos_id}  # EOS ends a turn, one id


def test_template_is_saved_in_tokenizer_config_and_loaded_back(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / CONFIG_FILE).read_text())
    assert config["chat_template"] == ROLE_TOKEN_TEMPLATE and config["eos_token"] == "<|endoftext|>"
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "tok" / CONFIG_FILE).write_text(json.dumps({**config, "chat_template": custom}))
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.apply_chat_template(CONVERSATION[1:3], tokenize=False) == "[user] What colour is the sky?\n[assistant] Blue.\n"
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(bpe)  # the template does not change text -> ids
    named = [{"name": "default", "template": custom}, {"name": "tool_use", "template": "{{ 1 }}"}]  # HF's list form
    (tmp_path / "tok" / CONFIG_FILE).write_text(json.dumps({**config, "chat_template": named}))
    assert load_tokenizer(tmp_path / "tok").chat_template == custom
    with pytest.raises(ConfigError, match="does not compile"):
        loaded.chat_template = "{% for m in messages %}"
    with pytest.raises(DataError, match="role"):
        bpe.apply_chat_template([{"role": "robot", "content": "hi"}])


def test_template_matches_transformers_rendering(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path / "tok")
    bpe.to_hf(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:4], True)):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert text == bpe.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
        assert hf(text, add_special_tokens=False)["input_ids"] == bpe.apply_chat_template(messages, add_generation_prompt=prompt)


@pytest.mark.parametrize("kind", ["bpe", "bpe-plain", "byte"])
def test_only_assistant_tokens_are_targets(tmp_path, kind):
    tok = build_tokenizer("byte" if kind == "byte" else "bpe", TEXTS + ["Blue. In water. " * 20], vocab_size=320)
    if kind == "bpe-plain":
        tok.chat_template = PLAIN_TEXT_TEMPLATE
    ids, trainable = encode_conversation(tok, CONVERSATION)
    if kind == "bpe-plain":  # encoded whole, BPE merges "Assistant: " into the answer (" Blue"): turn by turn it cannot
        assert ids[1:] != tok.apply_chat_template(CONVERSATION)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids[1:], skip_special_tokens=False) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    targets = [i for i, t in zip(ids, trainable) if t]
    end = tok.special_token_ids.get("<|end|>", tok.eos_id) if kind == "bpe" else tok.eos_id
    answers = [tok.encode(m["content"]) + [end] for m in CONVERSATION if m["role"] == "assistant"]
    assert targets == answers[0] + answers[1]
    # The prompt a chat builds is exactly the training prefix before the last answer.
    prompt, _ = encode_conversation(tok, CONVERSATION[:4], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt and all(trainable[len(prompt):])
    x, y = sft_windows(tmp_path, tok, ids, trainable, 256, eos_padding=False).batch([0])
    scored = y[0][y[0] != IGNORE_INDEX].tolist()
    assert scored == targets and x[0, 0] == tok.bos_id


def test_char_tokenizer_learns_the_plain_template_role_names(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n", encoding="utf-8")
    dp = psannLMDataPrep.from_sft([path], tokenizer="char", max_length=256, val_split=0.0)
    ids, _ = encode_conversation(dp.tokenizer, CONVERSATION)
    assert dp.tokenizer.unk_id not in ids
    data = dp.train_windows.data
    assert all("mask_file" in s for s in data.shards) and dp.train_windows.layout == "examples"  # masked shards


def test_diffusion_sft_masks_only_assistant_turns_and_padding(tmp_path, bpe):
    from psann.lm.data.sft import response_positions

    ids, trainable = encode_conversation(bpe, CONVERSATION)
    x, y = sft_windows(tmp_path, bpe, ids, trainable, len(ids) + 5, eos_padding=True).batch([0])
    maskable = response_positions(y)[0].tolist()
    # x[t] may be masked exactly where it is an assistant token, or the EOS padding after the window's text
    assert maskable == trainable[:len(ids) - 1] + [True] * 6
    assert x[0, len(ids) - 1:].tolist() == [bpe.eos_id] * 6


def test_a_template_that_writes_bos_gets_one_bos():
    tok = build_tokenizer("bpe", TEXTS, vocab_size=300)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    ids, trainable = encode_conversation(tok, CONVERSATION[1:3])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and len(ids) == len(trainable)


def test_template_that_rewrites_history_is_refused(bpe):
    from psann.lm.tokenizers import build_tokenizer as build

    tok = build("bpe", TEXTS, vocab_size=300)
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="prefix"):
        encode_conversation(tok, CONVERSATION)


def _write_conversations(path: Path, repeats: int = 6) -> Path:
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in FACTS] * repeats
    lines.append(json.dumps({"prompt": "Say hi.", "response": "Hi."}))  # pairs mix with conversations
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model fine-tuned on a handful of conversations until it has memorised them."""
    tmp = tmp_path_factory.mktemp("chat")
    dp = psannLMDataPrep.from_sft([_write_conversations(tmp / "chat.jsonl")], tokenizer="bpe", vocab_size=300,
                                  max_length=48, val_split=0.0)
    lm = psannLM(base="transformer", d_model=64, n_layers=2, n_heads=4)
    lm.fit(dp, max_steps=50, batch_tokens=8 * 48, lr=5e-3, warmup_steps=5, weight_decay=0.0, progress=False,
           plot=False, eval_interval_steps=0, checkpoint_dir=str(tmp / "run"))
    lm.save(tmp / "ckpt")
    return lm, tmp / "ckpt", dp


def test_sft_on_conversations_learns_the_answers(chat_model):
    lm, _, dp = chat_model
    tok = dp.tokenizer
    assert dp.train_windows.n_target_tokens == sum(len(tok.encode(a)) + 1 for _, a in FACTS) * 6 + len(tok.encode("Hi.")) + 1
    for question, answer in FACTS:
        assert lm.chat([{"role": "user", "content": question}], temperature=0, max_new_tokens=16) == answer


def test_session_streams_and_keeps_history_within_the_context(chat_model):
    lm, _, _ = chat_model
    session = ChatSession(lm, system="Be brief.", temperature=0, max_new_tokens=16)
    chunks = []
    reply = session.send(FACTS[0][0], on_text=chunks.append)
    assert chunks and chunks[-1] == reply  # the stream ends with exactly the reply (end-of-turn not shown)
    assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:]))  # text only grows while streaming
    for question, _ in FACTS * 3:
        session.send(question)
        assert session.prompt_tokens <= lm.model_config.max_seq_len - 16
    assert session.dropped_turns > 0 and len(session.messages) == 2 * (1 + len(FACTS) * 3)
    session.messages.append({"role": "user", "content": FACTS[0][0]})
    text = lm.tokenizer.decode(session.prompt_ids(), skip_special_tokens=False)
    assert text.startswith("<|bos|><|system|>Be brief.<|end|><|user|>")  # the system message is never dropped
    assert text.endswith(f"<|user|>{FACTS[0][0]}<|end|><|assistant|>")  # the newest message always stays
    session.set_option("temperature", 0.7)
    assert session.settings.temperature == 0.7
    with pytest.raises(ConfigError):
        session.set_option("top_p", 2.0)
    session.reset()
    assert session.messages == []


def test_train_cli_fine_tunes_a_checkpoint_on_conversations(chat_model, tmp_path):
    _, ckpt, _ = chat_model
    config = tmp_path / "sft.yaml"
    config.write_text(f"data:\n  sft_files: [{_write_conversations(tmp_path / 'more.jsonl', 2)}]\n  max_length: 48\n"
                      f"train:\n  init_from: {ckpt}\n  max_steps: 3\n  batch_tokens: 192\n  progress: false\n"
                      f"  plot: false\n  checkpoint_dir: {tmp_path / 'run'}\nmodel:\n  dropout: 0.1\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "psann.cli", "train", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    final = tmp_path / "run" / "checkpoints" / "final"
    saved = json.loads((final / "config.json").read_text())["config"]
    base = json.loads((ckpt / "config.json").read_text())["config"]
    assert saved["model"] == {**base["model"], "dropout": 0.1}  # the checkpoint's model, the key set here wins
    assert tokenizer_fingerprint(load_tokenizer(final / "tokenizer")) == tokenizer_fingerprint(load_tokenizer(ckpt / "tokenizer"))


def test_init_from_takes_keys_the_config_names_and_the_checkpoint_context(chat_model, tmp_path):
    from psann.lm.config import load_config
    from psann.lm.train.checkpoint import read_checkpoint_config
    from psann.lm.train.run import resolve_run_config

    _, ckpt, _ = chat_model
    base = [f"--train.init_from={ckpt}", f"--train.checkpoint_dir={tmp_path}"]
    resolved = resolve_run_config(load_config(None, base + ["--model.d_model=512"]))  # 512 is the default, set on purpose
    assert resolved.model.d_model == 512 and resolved.model.n_layers == 2 and resolved.data.max_length == 48
    assert resolved.data.tokenizer_model_path == str(ckpt / "tokenizer")
    with pytest.raises(ConfigError, match="longer than the 48-token context"):
        resolve_run_config(load_config(None, base + ["--data.max_length=96"]))
    with pytest.raises(ConfigError, match="both set"):  # a resume continues a run; it starts from no other weights
        resolve_run_config(load_config(None, base + [f"--train.resume_from={ckpt}"]))
    resumed = resolve_run_config(load_config(None, [f"--train.resume_from={ckpt}", f"--train.checkpoint_dir={tmp_path}"]))
    assert resumed.model == read_checkpoint_config(ckpt).model  # resuming takes the checkpoint's model
    from psann.lm.train.cli import main as train_main

    assert train_main(["--print-config", *base]) == 0  # shows what will run: the checkpoint's model


def test_init_from_refuses_data_with_another_tokenizer(chat_model, tmp_path):
    _, ckpt, _ = chat_model
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n", encoding="utf-8")
    dp = psannLMDataPrep.from_sft([path], tokenizer="char", max_length=48, val_split=0.0)
    with pytest.raises(ConfigError, match="not the one"):
        psannLM(d_model=64, n_layers=2, n_heads=4).fit(dp, init_from=str(ckpt), max_steps=1, progress=False,
                                                      checkpoint_dir=str(tmp_path / "run"))


def _chat_command(ckpt, *extra):
    return [sys.executable, "-m", "psann.cli", *extra, "--ckpt", str(ckpt), "--temperature", "0", "--max-new-tokens", "16"]


def test_chat_cli_with_piped_input(chat_model):
    _, ckpt, _ = chat_model
    script = "/temp 0\n/topk 5\n/topp 0.9\n/topk off\nWhat colour is the sky?\n/topp 7\n/bogus\n/reset\nWhere do fish live?\n/quit\nnever read\n"
    for command in (["chat"], ["generate", "--interactive"]):
        proc = subprocess.run(_chat_command(ckpt, *command), input=script, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        out = proc.stdout
        assert proc.returncode == 0, proc.stderr
        assert "(temperature = 0.0)" in out and "(top_k = 5)" in out and "(top_p = 0.9)" in out and "(top_k = None)" in out
        assert "assistant> The sky is blue.\n" in out and "assistant> Fish live in water.\n" in out
        assert "cannot set top_p" in out and "unknown command /bogus" in out and "(conversation cleared)" in out
        assert out.count("assistant> ") == 2


def test_ctrl_c_stops_a_reply_but_not_the_session(chat_model, monkeypatch):
    import io

    from psann.lm.infer.chat import chat_loop

    lm, _, _ = chat_model
    session = ChatSession(lm, temperature=0, max_new_tokens=16)
    calls = []

    def interrupted_once(self, text, on_text=None):
        calls.append(text)
        if len(calls) == 1:
            self.messages.append({"role": "user", "content": text})
            raise KeyboardInterrupt
        return original(self, text, on_text)

    original = ChatSession.send
    monkeypatch.setattr(ChatSession, "send", interrupted_once)
    out = io.StringIO()
    assert chat_loop(session, io.StringIO("Who was there?\nWhere do fish live?\n"), out) == 0
    assert "(reply interrupted" in out.getvalue() and "assistant> Fish live in water.\n" in out.getvalue()
    assert [m["content"] for m in session.messages] == ["Where do fish live?", "Fish live in water."]


def _read_until(fd, marker: bytes, timeout: float = 60.0) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while marker not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {data!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        data += chunk
    return data


def test_chat_in_a_pseudo_terminal(chat_model):
    """As a person would: a terminal, a prompt to answer, streamed replies, /quit."""
    _, ckpt, _ = chat_model
    master, slave = pty.openpty()
    proc = subprocess.Popen(_chat_command(ckpt, "chat"), stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=ROOT)
    os.close(slave)
    try:
        assert b"you> " in _read_until(master, b"you> ")
        os.write(master, b"Where do fish live?\n")
        answer = _read_until(master, b"you> ")
        assert b"assistant> Fish live in water." in answer
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill() if proc.poll() is None else None
        os.close(master)


def test_chat_refuses_a_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "psann.cli", "chat", "--ckpt", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, input="")
    assert proc.returncode == 2 and "error:" in proc.stderr
