"""psannlm export hf / import hf: the transformers classes people use (AutoModelForCausalLM,
AutoTokenizer, pipeline, apply_chat_template) give what psannlm generate and psannlm chat give,
and the directory comes back as the same checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from psann.cli import main as cli  # noqa: E402
from psann.lm import psannLM  # noqa: E402
from psann.lm.config import ModelConfig, RunConfig  # noqa: E402
from psann.lm.models import build_model  # noqa: E402
from psann.lm.tokenizers import build_tokenizer  # noqa: E402
from psann.lm.tokenizers.chat import encode_conversation  # noqa: E402
from psann.lm.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from test_eval_mc import TEXTS  # noqa: E402

PROMPT, MESSAGES = "little tom went to the", [{"role": "system", "content": "Answer briefly."},
                                              {"role": "user", "content": "where did tom go?"}]


def confident_checkpoint(directory, kind: str = "bpe") -> str:
    """A random transformer whose argmaxes are far apart (no near-ties between two libraries' maths)."""
    tok = build_tokenizer(kind, TEXTS, vocab_size=300)
    config = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, max_seq_len=64)
    torch.manual_seed(3)
    model = build_model(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    save_checkpoint(directory, model, tok, RunConfig(model=config))
    return str(directory)


@pytest.fixture(scope="module", params=["bpe", "tokenizers"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    ckpt = confident_checkpoint(root / "ckpt", request.param)
    assert cli(["export", "hf", "--ckpt", ckpt, "--out", str(root / "hf")]) == 0
    return ckpt, root / "hf"


def test_auto_classes_and_the_pipeline_give_psanns_greedy_text(exported):
    ckpt, hf_dir = exported
    lm = psannLM.load(ckpt, device="cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(PROMPT).input_ids
    assert ids == lm.tokenizer.encode(PROMPT, add_bos=True)  # BOS first, as psann prompts start
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=12)
    expected = lm.generate(PROMPT, max_new_tokens=12, temperature=0)
    assert tokenizer.decode(out[0, len(ids):], skip_special_tokens=True) == expected
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    [result] = pipe(PROMPT, max_new_tokens=12, do_sample=False, return_full_text=False)
    assert result["generated_text"] == expected
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    tok = lm.tokenizer
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        tok.bos_id, tok.eos_id, tok.pad_id)
    specials = json.loads((hf_dir / "special_tokens_map.json").read_text())
    names = tok.special_tokens()
    assert specials["bos_token"] == names[tok.bos_id] and specials["eos_token"] == names[tok.eos_id]


def test_apply_chat_template_renders_what_psannlm_chat_feeds(exported):
    ckpt, hf_dir = exported
    tok = psannLM.load(ckpt, device="cpu").tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids, _ = encode_conversation(tok, MESSAGES, add_generation_prompt=True)
    rendered = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered == tok.special_tokens()[tok.bos_id] + tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False)
    hf_ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert list(getattr(hf_ids, "input_ids", hf_ids)) == ids


def test_import_hf_gives_the_same_checkpoint_back(exported, tmp_path):
    ckpt, hf_dir = exported
    assert cli(["import", "hf", str(hf_dir), "--out", str(tmp_path / "back")]) == 0
    model, tok, _ = load_checkpoint(ckpt)
    back_model, back_tok, config = load_checkpoint(tmp_path / "back")
    assert config.model.base == "transformer" and back_tok.kind == tok.kind
    state, back = model.state_dict(), back_model.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    assert all(back_tok.encode(t) == tok.encode(t) for t in TEXTS[:5] + [PROMPT])
    assert back_tok.chat_template == tok.chat_template  # the exported BOS prefix is taken off again
    assert encode_conversation(back_tok, MESSAGES, add_generation_prompt=True) == encode_conversation(
        tok, MESSAGES, add_generation_prompt=True)


def test_other_families_and_tokenizers_are_refused_with_the_reason(tmp_path, capsys):
    tok = build_tokenizer("byte")
    for name, config in (("byte", ModelConfig(base="byte", d_model=32, n_layers=1, n_heads=2, vocab_size=256,
                                              max_seq_len=32)),
                         ("diffusion", ModelConfig(d_model=32, n_layers=1, n_heads=2, vocab_size=257, max_seq_len=32,
                                                   objective="diffusion", mask_token_id=256))):
        save_checkpoint(tmp_path / name, build_model(config), tok, RunConfig(model=config))
        assert cli(["export", "hf", "--ckpt", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        assert not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "a byte model and it reads raw bytes" in err and "diffusion model; HF Llama is a causal LM" in err
    config = ModelConfig(d_model=32, n_layers=1, n_heads=2, vocab_size=256, max_seq_len=32)
    save_checkpoint(tmp_path / "bytes_tok", build_model(config), tok, RunConfig(model=config))
    assert cli(["export", "hf", "--ckpt", str(tmp_path / "bytes_tok"), "--out", str(tmp_path / "out")]) == 2
    assert "'byte' tokenizer has no Hugging Face tokenizer.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
