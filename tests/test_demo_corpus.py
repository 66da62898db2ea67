"""Tests for the built-in demo story corpus generator."""

from __future__ import annotations

import os
import random
import re
import time

import pytest

from psann.lm.data.demo_corpus import (
    DEMO_CORPUS_VERSION,
    generate_stories,
    generate_story,
    write_demo_corpus,
)

SPEECH_VERBS = {"said", "asked", "cried", "shouted", "whispered", "called", "replied", "laughed"}


@pytest.fixture(scope="module")
def stories() -> list[str]:
    return generate_stories(1000, seed=0)


def test_version_is_int() -> None:
    assert isinstance(DEMO_CORPUS_VERSION, int) and DEMO_CORPUS_VERSION >= 1


def test_deterministic_per_seed() -> None:
    assert generate_stories(50, seed=7) == generate_stories(50, seed=7)
    assert generate_stories(50, seed=7) != generate_stories(50, seed=8)
    # generate_story only uses the rng it is given
    assert generate_story(random.Random(3)) == generate_story(random.Random(3))


def test_does_not_touch_global_rng() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_stories(20, seed=1)
    assert random.random() == expected


def test_stories_shape(stories: list[str]) -> None:
    for story in stories:
        assert story.strip() == story and story
        assert "\n" not in story
        assert re.search(r'[.!?]"?$', story), story
        assert "{" not in story and "}" not in story, story
        assert "  " not in story, story
        assert story.count('"') % 2 == 0, story
    lengths = [len(s.split()) for s in stories]
    assert 60 <= min(lengths) and max(lengths) <= 230
    assert 100 <= sum(lengths) / len(lengths) <= 180


def test_articles(stories: list[str]) -> None:
    for story in stories:
        assert not re.search(r"\b[Aa] [aeiouAEIOU]", story), story
        assert not re.search(r"\b[Aa]n [b-df-hj-np-tv-zB-DF-HJ-NP-TV-Z]", story), story
        assert " a a " not in story and " the the " not in story, story


def test_sentence_starts_capitalised(stories: list[str]) -> None:
    for story in stories:
        assert re.match(r'"?[A-Z]', story), story
        # after a full stop (or a quote closed by one) a new sentence starts
        assert not re.search(r'[.!?] "?[a-z]', story), story
        assert not re.search(r'\." [a-z]', story), story
        # a quote opened after "said," starts with a capital
        assert not re.search(r', "[a-z]', story), story
        # lowercase right after '!"' or '?"' must be a dialogue tag ("she asked")
        for m in re.finditer(r'[!?]" ([a-z][^.!?]*)', story):
            words = re.findall(r"[a-z]+", m.group(1))[:4]
            assert SPEECH_VERBS & set(words), story


def test_pronouns_agree(stories: list[str]) -> None:
    for story in stories:
        assert not re.search(r"\b(?:[Tt]hey) (?:was|is|has)\b", story), story
        assert not re.search(r"\b(?:[Ss]he|[Hh]e|[Ii]t) were\b", story), story


def test_diversity(stories: list[str]) -> None:
    words = {w.lower() for s in stories for w in re.findall(r"[A-Za-z']+", s)}
    assert len(words) >= 300, len(words)
    assert len(set(stories)) / len(stories) >= 0.99
    openings = {s.split(".")[0] for s in stories}
    assert len(openings) > 200


def test_write_demo_corpus(tmp_path) -> None:
    path = tmp_path / "sub" / "corpus.txt"
    info = write_demo_corpus(path, target_bytes=50_000, seed=5)
    data = path.read_bytes()
    assert info == {"path": str(path), "stories": info["stories"], "bytes": len(data), "seed": 5}
    assert len(data) >= 50_000
    parts = data.decode("utf-8").split("\n\n")
    assert len(parts) == info["stories"]
    assert parts == generate_stories(info["stories"], seed=5)
    # the last story is the one that crossed the target
    assert len("\n\n".join(parts[:-1]).encode("utf-8")) < 50_000
    assert os.listdir(path.parent) == ["corpus.txt"]  # no temp file left behind


def test_write_demo_corpus_custom_separator_and_overwrite(tmp_path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("old")
    info = write_demo_corpus(str(path), target_bytes=10_000, seed=1, separator="\n<|end|>\n")
    text = path.read_text(encoding="utf-8")
    assert text.count("<|end|>") == info["stories"] - 1
    assert info["bytes"] == len(text.encode("utf-8")) >= 10_000
    assert sorted(os.listdir(tmp_path)) == ["c.txt"]
    again = tmp_path / "d.txt"
    write_demo_corpus(again, target_bytes=10_000, seed=1, separator="\n<|end|>\n")
    assert again.read_bytes() == path.read_bytes()


def test_speed() -> None:
    start = time.perf_counter()
    stories = generate_stories(1500, seed=2)  # about 1 MB
    elapsed = time.perf_counter() - start
    assert sum(len(s) for s in stories) > 800_000
    assert elapsed < 2.5, elapsed
