"""The public facade, including the spec quickstart as written."""

import pytest

from psann.lm import psannLM, psannLMDataPrep
from psann.lm.errors import ConfigError


def test_spec_quickstart_runs_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fit's default run directory is runs/<timestamp> under the cwd
    from psann.lm import psannLM, psannLMDataPrep

    texts = ["hello world", "goodnight moon"]
    dp = psannLMDataPrep(
        texts,
        tokenizer="auto",             # sentencepiece -> tokenizers -> char fallback
        tokenizer_model_path=None,
        max_length=256,
        pack_sequences=True,
    )

    model = psannLM(
        base="waveresnet",
        d_model=512,
        n_layers=8,
        n_heads=8,
        vocab_size=dp.vocab_size,
        rope=True,
        sine_params=dict(amp_init=1.0, freq_init=1.0, damp_init=0.01, trainable=True),
    )

    model.fit(dp, epochs=1, batch_tokens=65_536, lr=2e-4, amp="bf16")
    print(model.generate("Once upon a time", top_p=0.9, max_new_tokens=64))
    print(model.generate_batch(["hello", "goodnight"], max_new_tokens=32))

    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "final" / "model.safetensors").exists()
    assert model.model_config.base == "waveresnet" and model.model.blocks[0].wave is not None


@pytest.mark.parametrize("base", ["respsann", "transformer"])
def test_spec_quickstart_with_other_bases(base, tmp_path):
    dp = psannLMDataPrep(["hello world", "goodnight moon"], tokenizer="auto", tokenizer_model_path=None,
                         max_length=256, pack_sequences=True)
    sine = dict(amp_init=1.0, freq_init=1.0, damp_init=0.01, trainable=True) if base != "transformer" else None
    model = psannLM(base=base, d_model=512, n_layers=8, n_heads=8, vocab_size=dp.vocab_size, rope=True, sine_params=sine)
    model.fit(dp, epochs=1, batch_tokens=65_536, lr=2e-4, amp="bf16", checkpoint_dir=str(tmp_path))
    assert isinstance(model.generate("Once upon a time", top_p=0.9, max_new_tokens=64), str)
    assert len(model.generate_batch(["hello", "goodnight"], max_new_tokens=32)) == 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    texts = [f"little {w} went to the market and bought {n} apples." for n in range(40) for w in ("tom", "ann")]
    dp = psannLMDataPrep(texts, tokenizer="char", max_length=32, val_split=0.1)
    lm = psannLM(d_model=32, n_layers=2, n_heads=4)
    lm.fit(dp, max_steps=40, batch_tokens=256, lr=1e-2, amp="fp32", progress=False, checkpoint_dir=str(run))
    return lm, run


def test_save_load_round_trip_generates_identically(trained, tmp_path):
    lm, _ = trained
    lm.save(tmp_path / "saved")
    again = psannLM.load(tmp_path / "saved")
    prompts = ["little tom", "little ann went to"]
    assert lm.generate_batch(prompts, temperature=0, max_new_tokens=20) == \
        again.generate_batch(prompts, temperature=0, max_new_tokens=20)
    assert again.tokenizer.encode("market") == lm.tokenizer.encode("market")


def test_generate_batch_rows_equal_single_prompts(trained):
    lm, _ = trained
    prompts = ["l", "little ann went to the", "little tom"]
    batch = lm.generate_batch(prompts, temperature=0, max_new_tokens=24)
    assert batch == [lm.generate(p, temperature=0, max_new_tokens=24) for p in prompts]


def test_prompt_is_encoded_with_bos_only(trained, monkeypatch):
    lm, _ = trained
    seen = {}
    import psann.lm.objectives.causal as causal

    real = causal.generate_tokens

    def spy(model, prompts, *args, **kwargs):
        seen["ids"] = prompts[0]
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(causal, "generate_tokens", spy)
    lm.generate("little", max_new_tokens=1)
    tok = lm.tokenizer
    assert seen["ids"] == [tok.bos_id, *tok.encode("little")] and tok.eos_id not in seen["ids"]


def test_stop_strings_cut_the_text(trained):
    lm, _ = trained
    full = lm.generate("little tom went", temperature=0, max_new_tokens=30)
    word = full.split()[1]
    cut = lm.generate("little tom went", temperature=0, max_new_tokens=30, stop=[word])
    assert cut == full[:full.index(word)]


def test_learned_something(trained):
    lm, run = trained
    assert lm.last_run["val_loss"] < 1.5  # uniform over the char vocabulary would be ~3.2 nats


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="Did you mean 'n_layers'"):
        psannLM(n_layer=4)
    with pytest.raises(RuntimeError, match="fit"):
        psannLM().generate("hi")
