"""`aqlmkit serve`'s API through the real `openai` client, against servers started here on free
loopback ports (uvicorn in a thread) with the tiny random Llama: completions, chat, streaming,
stop strings, errors (400/401/413/429), disconnects, /v1/models, /health, /metrics, and a load test
whose every stream is checked token by token against batch-1 greedy decoding."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")

from aqlmkit.cli import main  # noqa: E402
from aqlmkit.formats.loading import load_model  # noqa: E402
from aqlmkit.runtime import Engine  # noqa: E402
from aqlmkit.runtime.api import ServerConfig  # noqa: E402
from aqlmkit.runtime.server import BackgroundServer  # noqa: E402

KEY = "test-key"
NAME = "tiny"
WORDS = ("the function returns a value when the loop ends and every name in the module is bound "
         "to an object of some type").split()


@pytest.fixture(scope="module")
def model_tok(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def server(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=8, context=256, max_queue=64)
    with BackgroundServer(engine, tok, ServerConfig(NAME, api_key=KEY, max_body_bytes=20_000,
                                                    max_tokens_limit=200)) as url:
        yield url


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(model, ids: list[int], n: int) -> list[int]:
    kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), **kw)[0, len(ids):].tolist()


def raw(url: str, path: str, body: bytes | None = None, key: str | None = KEY, timeout: float = 30):
    """(status, headers, body bytes) of one plain HTTP request (stdlib, no client niceties)."""
    req = urllib.request.Request(url + path, data=body, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_models_health_and_completion(client, server, model_tok):
    model, tok = model_tok
    assert [m.id for m in client.models.list().data] == [NAME]
    status, _, body = raw(server, "/health", key=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    r = client.completions.create(model=NAME, prompt="The function", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    ids = tok("The function")["input_ids"]
    want = greedy(model, ids, 8)
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == want and choice.finish_reason == "length"
    assert choice.text == tok.decode(want, skip_special_tokens=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 8, len(ids) + 8)


def test_completion_equals_aqlmkit_generate(client, tiny_llama_dir, capsys):
    r = client.completions.create(model=NAME, prompt="The loop", max_tokens=6, temperature=0)
    assert main(["generate", "-m", str(tiny_llama_dir), "-p", "The loop", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == "The loop" + r.choices[0].text + "\n"


def test_chat_and_streaming(client, server, model_tok):
    model, tok = model_tok
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    assert r.choices[0].model_extra["token_ids"] == greedy(model, ids, 6)
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-2].choices[0].finish_reason == "length"
    body = json.dumps({"model": NAME, "prompt": "x", "max_tokens": 3, "stream": True}).encode()
    status, headers, data = raw(server, "/v1/completions", body)
    events = [line for line in data.decode().splitlines() if line.startswith("data:")]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert events[-1].strip() == "data: [DONE]" and len(events) >= 2


def test_stop_strings(client):
    free = client.completions.create(model=NAME, prompt="The value", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    needle = free[len(free) // 2: len(free) // 2 + 2]
    r = client.completions.create(model=NAME, prompt="The value", max_tokens=16, temperature=0,
                                  stop=[needle, "never-appears"], extra_body={"ignore_eos": True})
    assert r.choices[0].text == free[: free.index(needle)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt="The value", max_tokens=16, temperature=0,
                                         stop=needle, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=NAME, prompt="The module", max_tokens=10, temperature=1.2, top_p=0.9, seed=7,
              extra_body={"top_k": 50, "ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


@pytest.mark.parametrize("kwargs,needle", [
    ({"model": "some/other/path"}, "is not served here"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 500}, "limit of 200"),
    ({"prompt": " ".join(WORDS * 20), "max_tokens": 100}, "exceeds the context"),
    ({"temperature": -1}, "temperature"),
    ({"n": 2}, "n=1"),
])
def test_bad_requests_get_400(client, kwargs, needle):
    args = {"model": NAME, "prompt": "x", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    err = e.value.response.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_bad_json_auth_and_body_limit(server):
    status, _, body = raw(server, "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    status, _, _ = raw(server, "/v1/chat/completions", json.dumps({"model": NAME, "messages": []}).encode())
    assert status == 400
    status, _, _ = raw(server, "/v1/completions", b'{"model": "tiny", "prompt": "' + b"a" * 30_000 + b'"}')
    assert status == 413
    for key in (None, "wrong"):
        status, headers, body = raw(server, "/v1/completions", b"{}", key=key)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_load_32_streams_match_batch1_greedy(server, model_tok):
    """32 concurrent streams (8 slots, the rest queued): every token equals batch-1 greedy."""
    model, tok = model_tok
    prompts = [" ".join(WORDS[i % len(WORDS):][: 1 + (7 * i) % 13]) for i in range(32)]
    lengths = [4 + i % 9 for i in range(32)]
    want = [greedy(model, tok(p)["input_ids"], n) for p, n in zip(prompts, lengths)]
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(p: str, n: int):
        ids, text = [], []
        stream = await aclient.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True,
                                                                           "return_token_ids": True})
        async for chunk in stream:
            ids += chunk.choices[0].model_extra["token_ids"]
            text.append(chunk.choices[0].text)
        return ids, "".join(text)

    async def everything():
        return await asyncio.wait_for(asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths))), 180)

    got = asyncio.run(everything())
    assert [g[0] for g in got] == want
    assert [g[1] for g in got] == [tok.decode(w, skip_special_tokens=True) for w in want]
    status, _, body = raw(server, "/metrics", key=None)
    text = body.decode()
    assert status == 200 and "aqlmkit_time_to_first_token_seconds_count" in text
    gen = [line for line in text.splitlines() if line.startswith("aqlmkit_generation_tokens_total")]
    assert float(gen[0].split()[-1]) >= sum(lengths)
    assert 'aqlmkit_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert json.loads(raw(server, "/health", key=None)[2])["running"] == 0


def test_queue_full_429_and_disconnect_frees_the_slot(model_tok):
    """One slot, one queue place, a slowed model: the third request gets 429 + Retry-After; closing
    a stream cancels its request and frees the slot."""
    model, tok = model_tok
    hook = model.register_forward_hook(lambda *a: time.sleep(0.01))
    engine = Engine(model, tok, max_batch=1, context=256, max_queue=1)
    try:
        with BackgroundServer(engine, tok, ServerConfig(NAME)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            kw = dict(model=NAME, prompt="The", max_tokens=200, temperature=0, stream=True,
                      extra_body={"ignore_eos": True})
            first = client.completions.create(**kw)
            next(iter(first))  # running: holds the only slot
            waiting = threading.Thread(target=lambda: list(client.completions.create(**kw)), daemon=True)
            waiting.start()
            _wait(lambda: engine.queue_depth == 1)
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=NAME, prompt="x", max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
            first.close()  # disconnect: the waiting request takes the slot long before 200 tokens
            _wait(lambda: engine.queue_depth == 0 and engine.running == 1)
            assert engine.steps < 150
            engine.stop()  # ends the second stream too
            waiting.join(10)
    finally:
        hook.remove()


def _wait(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_serve_cli_end_to_end(tiny_llama_dir):
    """`aqlmkit serve` as a user runs it (a subprocess on a free loopback port), then SIGINT."""
    import signal
    import subprocess
    import sys

    from aqlmkit.runtime.server import free_port

    port = free_port()
    cmd = [sys.executable, "-c", "from aqlmkit.cli import main; raise SystemExit(main())", "serve",
           "-m", str(tiny_llama_dir), "--port", str(port), "--max-batch", "2", "--context", "128",
           "--api-key", KEY, "--served-model-name", NAME]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _up(url) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.stderr.read()
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = client.completions.create(model=NAME, prompt="The", max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert f"http://127.0.0.1:{port}/v1" in err and "2 slots x 128 tokens" in err


def _up(url: str) -> bool:
    try:
        return raw(url, "/health", key=None, timeout=2)[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("argv,needle", [
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--port", "0"], "--port"),
])
def test_serve_cli_bad_arguments(argv, needle, tiny_llama_dir, capsys):
    assert main(["serve", "-m", str(tiny_llama_dir), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_checkpoint_without_tokenizer_is_one_line(tmp_path, make_tiny_model, capsys):
    """An AQLM checkpoint saved without a tokenizer loads (tokenizer None): one line, exit 2."""
    from aqlmkit.formats.aqlm_hf import save_quantized
    from nn_helpers import random_quantized

    save_quantized(random_quantized(make_tiny_model("llama"), "2x8g8"), None, tmp_path / "m", "2x8g8")
    capsys.readouterr()
    for cmd in (["serve"], ["generate", "-p", "x"], ["chat", "-p", "x"]):
        assert main([cmd[0], "-m", str(tmp_path / "m"), *cmd[1:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has no tokenizer" in err[0]
    assert main(["generate", "-m", str(tmp_path / "m"), "-p", "  "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
