"""aqlmkit.runtime.Engine: continuous batching gives every request the tokens it gets alone (and
that transformers' greedy generate gives), on plain and AQLM models; sampling, stops, cancellation,
queue limits and the text tracker."""
from __future__ import annotations

import pytest
import torch

from aqlmkit.errors import AqlmkitError
from aqlmkit.formats.aqlm_hf import load_quantized, save_quantized
from aqlmkit.runtime import Engine, QueueFull, SamplingParams
from aqlmkit.runtime.text import TextTracker
from nn_helpers import random_quantized

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def prompts(n: int, seed: int = 0, longest: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (n,), generator=g).tolist()
    return [torch.randint(4, 500, (k,), generator=g).tolist() for k in lengths]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), **kw)[0, len(prompt):].tolist()


def run_all(engine: Engine, reqs: list[tuple[list[int], SamplingParams]], max_steps: int = 2000) -> list[list]:
    """Submit everything at once and step until all finish; events per request."""
    events: list[list] = [[] for _ in reqs]
    handles = [engine.submit(p, sp, events[i].append) for i, (p, sp) in enumerate(reqs)]
    for _ in range(max_steps):
        if all(h.finish_reason is not None for h in handles):
            break
        engine.step()
    assert all(h.finish_reason is not None for h in handles), "engine did not finish in bounded steps"
    engine.step()  # retire the last ones
    return events


def tokens(evs) -> list[int]:
    return [e.token_id for e in evs if e.token_id >= 0]


@pytest.fixture(scope="module")
def aqlm_model(tmp_path_factory, make_tiny_model):
    model = random_quantized(make_tiny_model("llama", vocab_size=512), "2x8g8", seed=3)
    out = save_quantized(model, None, tmp_path_factory.mktemp("eng") / "q", "2x8g8")
    return load_quantized(out)[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "aqlm"])
def test_batched_equals_alone_equals_generate(family, make_tiny_model, aqlm_model):
    """16 requests of mixed prompt lengths, joining while others decode (prefill chunks of 7).

    The AQLM CPU kernels take a different path for a 7-row chunk than for a whole prompt (LUT vs
    gather), which rounds differently, so there transformers is matched with whole-prompt prefill
    and chunked prefill is checked against the same engine serving one request at a time."""
    model = aqlm_model if family == "aqlm" else make_tiny_model(family, vocab_size=512)
    ps = prompts(16, seed=1)
    want = [hf_greedy(model, p, GREEDY.max_tokens) for p in ps]
    whole = Engine(model, max_batch=1, context=64, prefill_chunk=64, len_bucket=16)
    assert [whole.generate(p, GREEDY) for p in ps] == want
    if family == "aqlm":
        chunked = Engine(model, max_batch=1, context=64, prefill_chunk=7, len_bucket=16)
        want = [chunked.generate(p, GREEDY) for p in ps]
    batched = Engine(model, max_batch=16, context=64, prefill_chunk=7, len_bucket=16)
    got = run_all(batched, [(p, GREEDY) for p in ps])
    assert [tokens(e) for e in got] == want
    assert batched.steps < 16 * GREEDY.max_tokens  # decode steps were shared
    assert batched.running == 0 and sorted(batched._free) == list(range(16))


def test_more_requests_than_slots_and_late_joiners(make_tiny_model):
    """24 requests through 4 slots (queue of 24); slots are reused; outputs stay per request."""
    model = make_tiny_model("llama", vocab_size=512)
    ps = prompts(24, seed=2, longest=20)
    params = [SamplingParams(max_tokens=1 + i % 7, temperature=0, ignore_eos=True) for i in range(24)]
    want = [hf_greedy(model, p, sp.max_tokens) for p, sp in zip(ps, params)]
    eng = Engine(model, max_batch=4, context=32, prefill_chunk=5, max_queue=24, len_bucket=8)
    got = run_all(eng, list(zip(ps, params)))
    assert [tokens(e) for e in got] == want
    assert all(e[-1].finish_reason == "length" for e in got)


def test_seeded_sampling_does_not_depend_on_the_batch(make_tiny_model):
    model = make_tiny_model("llama", vocab_size=512)
    ps = prompts(6, seed=4)
    sp = SamplingParams(max_tokens=10, temperature=1.3, top_k=40, top_p=0.9, seed=11, ignore_eos=True)
    alone = Engine(model, max_batch=1, context=64)
    want = [alone.generate(p, sp) for p in ps]
    mixed = [(p, sp if i % 2 == 0 else GREEDY) for i, p in enumerate(ps)]
    got = run_all(Engine(model, max_batch=8, context=64), mixed)
    assert [tokens(got[i]) for i in range(0, 6, 2)] == want[0::2]
    other_seed = SamplingParams(max_tokens=10, temperature=1.3, top_k=40, top_p=0.9, seed=12, ignore_eos=True)
    assert alone.generate(ps[0], other_seed) != want[0]


def test_stop_token_ids_eos_and_stop_strings(tiny_llama):
    model, tok = tiny_llama
    eng = Engine(model, tok, max_batch=2, context=64)
    prompt = tok("The function")["input_ids"]
    free = eng.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    stop_id = free[4]
    cut = eng.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                              stop_token_ids=(stop_id,)))
    assert cut == free[: free.index(stop_id) + 1]
    text = tok.decode(free, skip_special_tokens=True)
    needle = text[len(text) // 2: len(text) // 2 + 2]
    evs = []
    eng.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(needle,)),
                 on_event=evs.append)
    assert "".join(e.text for e in evs) == text[: text.index(needle)] and evs[-1].finish_reason == "stop"
    eos_engine = Engine(model, tok, max_batch=1, context=64)
    eos_engine.eos_ids = {free[2]}
    assert eos_engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[-1] == free[2]


def test_cancel_frees_the_slot_and_queue_limit(make_tiny_model):
    model = make_tiny_model("llama", vocab_size=512)
    eng = Engine(model, max_batch=1, context=64, max_queue=1)
    long = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    seen = []
    a = eng.submit([5, 6, 7], long, seen.append)
    for _ in range(3):
        eng.step()
    b = eng.submit([8, 9], GREEDY, lambda ev: None)  # waits: the only slot is taken
    with pytest.raises(QueueFull):
        eng.submit([1], GREEDY, lambda ev: None)
    eng.cancel(a)
    eng.step()
    assert a.finish_reason == "cancelled" and seen[-1].finish_reason == "cancelled"
    assert b.slot == 0 and eng.queue_depth == 0  # b took the freed slot at once
    eng.cancel(b)
    eng.step()
    assert eng.running == 0 and eng._free == [0]


def test_bad_requests_are_refused(make_tiny_model):
    eng = Engine(make_tiny_model("llama", vocab_size=512), max_batch=1, context=16)
    with pytest.raises(AqlmkitError, match="empty"):
        eng.submit([], GREEDY, print)
    with pytest.raises(AqlmkitError, match="exceeds the context"):
        eng.submit([1] * 10, GREEDY, print)
    with pytest.raises(AqlmkitError, match="token ids"):
        eng.submit([600], SamplingParams(max_tokens=2, temperature=0), print)
    with pytest.raises(AqlmkitError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_sliding_window_models_are_refused(make_tiny_model):
    with pytest.raises(AqlmkitError, match="full-attention"):
        Engine(make_tiny_model("mistral", vocab_size=512, sliding_window=8), max_batch=1, context=16)


def test_text_tracker_holds_back_possible_stops(tiny_tokenizer):
    ids = tiny_tokenizer("hello world, this is the end")["input_ids"]
    tr = TextTracker(tiny_tokenizer, stop=("the end",))
    out = "".join(tr.add(i) for i in ids) + tr.finish()
    assert out == "hello world, this is " and tr.stopped
    plain = TextTracker(tiny_tokenizer, stop=("zzz",))
    assert "".join(plain.add(i) for i in ids) + plain.finish() == tiny_tokenizer.decode(ids)
    emoji = tiny_tokenizer("é€😀")["input_ids"]  # multi-byte characters split across byte tokens
    tr = TextTracker(tiny_tokenizer)
    deltas = [tr.add(i) for i in emoji]
    assert "".join(deltas) == "é€😀" and all("\ufffd" not in d for d in deltas)


@pytest.mark.slow
def test_compiled_decode_matches_eager(make_tiny_model):
    """torch.compile per (rows, columns) bucket (inductor, one bucket: ~15-30 s on 2 cores)."""
    model = make_tiny_model("llama", vocab_size=512)
    ps = prompts(2, seed=5, longest=10)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = [tokens(e) for e in run_all(Engine(model, max_batch=2, context=32), [(p, sp) for p in ps])]
    eng = Engine(model, max_batch=2, context=32, compile=True)
    assert [tokens(e) for e in run_all(eng, [(p, sp) for p in ps])] == want
    assert sorted(eng._graphs) == [(2, 32)]  # both prompts read in the first iteration, then 2 rows
    assert all(g.warm for g in eng._graphs.values())
    assert [tokens(e) for e in run_all(eng, [(p, sp) for p in ps[::-1]])] == want[::-1]  # reused


def test_a_failing_step_ends_its_requests_and_the_loop_goes_on(make_tiny_model, monkeypatch, capsys):
    """The engine thread survives a step that raises: those requests end with "error", later ones run."""
    import threading

    model = make_tiny_model("llama", vocab_size=512)
    eng = Engine(model, max_batch=2, context=32)
    real = eng._decode
    monkeypatch.setattr(eng, "_decode", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    done = threading.Event()
    evs = []
    eng.start()
    try:
        eng.submit([5, 6], GREEDY, lambda ev: (evs.append(ev), ev.finish_reason and done.set()))
        assert done.wait(30) and evs[-1].finish_reason == "error"
        monkeypatch.setattr(eng, "_decode", real)
        done.clear()
        evs.clear()
        eng.submit([5, 6], GREEDY, lambda ev: (evs.append(ev), ev.finish_reason and done.set()))
        assert done.wait(30) and evs[-1].finish_reason == "length" and len(evs) == GREEDY.max_tokens
    finally:
        eng.stop()
    assert "RuntimeError: boom" in capsys.readouterr().err
