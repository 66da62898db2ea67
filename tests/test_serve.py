"""psannlm serve through the official openai client: completions and chat, streaming, continuous
batching whose greedy answers equal the single-request ones bit for bit, bad requests, a client
that leaves mid-stream, a full queue, the API key. Servers bind 127.0.0.1 on a free port and are
stopped by the test that started them."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (installed with openai)
import uvicorn  # noqa: E402

from psann.lm import psannLM  # noqa: E402
from psann.lm.serve.app import create_app  # noqa: E402
from test_eval_mc import save_tiny_checkpoint  # noqa: E402
from test_eval_mc import one_thread  # noqa: E402,F401  (its autouse fixture applies here too)

PROMPTS = ["little tom went to the", "little ann", "tom bought", "ann went to the market and",
           "12 apples", "little", "the market", "bought 3 apples and went"]


@contextlib.contextmanager
def serving(lm, **options):
    """(base URL, app) of a server on a free loopback port, stopped on exit."""
    app = create_app(lm, model_name=options.pop("model_name", "tiny"), **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return psannLM.load(save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "c"), device="cpu")


@pytest.fixture(scope="module")
def server(lm):
    with serving(lm, slots=4, max_queue=16) as (url, app):
        yield url, app


def greedy(c, prompt: str, **options):
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=options.pop("max_tokens", 12), temperature=0,
                             **options)
    return r.choices[0].text, r.choices[0].finish_reason


def test_models_health_completion_and_chat(server, lm):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["batching"] == "continuous" and health["slots"] == 4
    r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode(PROMPTS[0], add_bos=True))
    assert r.usage.completion_tokens == 10 and r.usage.total_tokens == r.usage.prompt_tokens + 10
    assert r.choices[0].text == lm.generate(PROMPTS[0], max_new_tokens=10, temperature=0)  # psannlm generate's answer
    messages = [{"role": "user", "content": "where did tom go?"}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == lm.chat(messages, max_new_tokens=6, temperature=0)  # the chat template
    assert chat.usage.prompt_tokens == len(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)) + 1


def test_concurrent_greedy_answers_equal_the_single_request_ones(server):
    url, _ = server
    c = client(url)
    alone = [greedy(c, p) for p in PROMPTS]
    assert len(set(alone)) > 1
    with ThreadPoolExecutor(len(PROMPTS) + 2) as pool:  # 8 greedy + 2 sampled requests over 4 slots
        sampled = [pool.submit(c.completions.create, model="tiny", prompt="tom", max_tokens=20, temperature=1.0)
                   for _ in range(2)]
        together = list(pool.map(lambda p: greedy(c, p), PROMPTS))
        assert all(s.result().choices[0].text is not None for s in sampled)
    assert together == alone


def test_streaming_is_server_sent_events_ending_in_done(server, lm):
    url, _ = server
    c = client(url)
    text, _ = greedy(c, PROMPTS[1], max_tokens=15)
    chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=15, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 15
    messages = [{"role": "user", "content": "hello"}]
    pieces = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == lm.chat(messages, max_new_tokens=8, temperature=0)
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "prompt": "tom", "max_tokens": 3,
                                                             "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stop_seed_and_n(server):
    url, _ = server
    c = client(url)
    full, _ = greedy(c, PROMPTS[0], max_tokens=20)
    stop = full.strip().split(" ")[1]
    cut, reason = greedy(c, PROMPTS[0], max_tokens=20, stop=[stop])
    assert reason == "stop" and cut == full[:full.index(stop)]
    streamed = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut  # a stop string never leaks into a stream
    runs = [c.completions.create(model="tiny", prompt="tom", max_tokens=12, temperature=1.0, seed=7, n=3)
            for _ in range(2)]
    assert [ch.text for ch in runs[0].choices] == [ch.text for ch in runs[1].choices]
    assert len(runs[0].choices) == 3 and len({ch.text for ch in runs[0].choices}) > 1  # seeds 7, 8, 9
    assert 0 < runs[0].usage.completion_tokens <= 3 * 12


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, lm):
    url, _ = server
    c = client(url)
    cases = [({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
             ({"model": "tiny", "prompt": "tom " * 60}, 400, "context_length_exceeded"),
             ({"model": "tiny", "prompt": "tom", "max_tokens": 45}, 400, "context_length_exceeded"),
             ({"model": "tiny", "prompt": "tom", "max_tokens": 0}, 400, None),
             ({"model": "tiny", "prompt": "tom", "top_p": 1.5}, 400, None),
             ({"model": "tiny", "prompt": "tom", "logprobs": 2}, 400, "unsupported_parameter"),
             ({"model": "tiny"}, 400, None)]
    for body, status, code in cases:
        r = httpx.post(f"{url}/v1/completions", json=body)
        error = r.json()["error"]
        assert r.status_code == status and error["code"] == code and error["message"], body
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "tom " * 60}])
    assert greedy(c, "tom")[1] == "length"


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    url, app = server
    engine = app.state.server.engine
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "prompt": "tom", "max_tokens": 40,
                                                             "stream": True, "temperature": 0}) as raw:
        next(raw.iter_lines())  # one event, then hang up
    deadline = time.monotonic() + 10
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.busy == 0
    assert greedy(client(url), "tom")[1] == "length"


def test_a_full_queue_answers_429_and_the_api_key_guards_every_route(lm):
    with serving(lm, slots=1, max_queue=0, api_key="sesame") as (url, app):
        engine, gate = app.state.server.engine, threading.Event()
        step = engine._step
        engine._step = lambda: (gate.wait(10), step())  # hold the scheduler: the first request waits in the queue
        c = client(url, "sesame")
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(greedy, c, "tom")
            deadline = time.monotonic() + 10
            while engine.busy == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="busy"):
                greedy(c, "ann")
            gate.set()
            assert first.result()[1] == "length"
        for path in ("/", "/health", "/v1/models"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/?api_key=sesame").status_code == 200  # the page, opened from a link
        with pytest.raises(openai.AuthenticationError):
            greedy(client(url, "wrong"), "tom")
        assert httpx.get(f"{url}/health", headers={"Authorization": "Bearer sesame"}).status_code == 200


def _hnet_checkpoint(directory) -> str:
    import torch

    from psann.lm.config import ModelConfig, RunConfig
    from psann.lm.models import build_model
    from psann.lm.tokenizers import build_tokenizer
    from psann.lm.train.checkpoint import save_checkpoint

    config = ModelConfig(base="hnet", d_model=[32, 48], num_blocks=[[1, 0, 1], [1]], n_heads=2, vocab_size=256,
                         max_seq_len=48)
    torch.manual_seed(0)
    save_checkpoint(directory, build_model(config), build_tokenizer("byte"), RunConfig(model=config))
    return str(directory)


def test_other_families_are_served_one_request_at_a_time(tmp_path):
    for name, ckpt in (("hnet", _hnet_checkpoint(tmp_path / "hnet")),
                       ("diffusion", save_tiny_checkpoint(tmp_path / "d", tokenizer="char", objective="diffusion"))):
        lm = psannLM.load(ckpt, device="cpu")
        with serving(lm, model_name=name) as (url, app):
            assert httpx.get(f"{url}/health").json()["batching"] == "sequential"
            c = client(url)
            r = c.completions.create(model=name, prompt="tom went", max_tokens=8, temperature=0)
            assert isinstance(r.choices[0].text, str) and r.usage.completion_tokens <= 8
            streamed = c.completions.create(model=name, prompt="tom went", max_tokens=8, temperature=0, stream=True)
            assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_the_chat_page_is_served_without_outside_resources(server):
    url, _ = server
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # works offline: no CDN


def _chromium():
    """A headless Chromium from Debian's packages (chromium + chromium-driver), driven by selenium."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("needs Debian's chromium and chromium-driver packages (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_the_chat_page_streams_a_reply_in_a_real_browser(lm):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(lm, slots=2) as (url, app):
        browser = _chromium()
        try:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 30)
            wait.until(lambda b: b.find_element(By.ID, "model").text == "tiny")  # it asked /v1/models
            for field, value in (("temperature", "1"), ("max_tokens", "12")):  # sampled: a random model's greedy
                browser.find_element(By.ID, field).clear()                     # reply is all role markers
                browser.find_element(By.ID, field).send_keys(value)
            browser.find_element(By.ID, "text").send_keys("where did tom go?\n")
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg")) == 2)
            wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())  # the stream has ended
            user, reply = browser.find_elements(By.CSS_SELECTOR, ".msg")
            assert user.text == "where did tom go?" and reply.get_attribute("class") == "msg assistant"
            assert reply.text.strip()
            history = browser.execute_script("return messages")  # the page keeps the turn for the next request
            assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"].strip() == reply.text.strip()
        finally:
            browser.quit()
