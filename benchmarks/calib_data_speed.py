"""Seconds spent on calibration data: ``calibration_batches(tok, "default", n, seqlen)``.

Cold = empty token cache (a fresh ``AQLMKIT_CACHE``), warm = the same call again. With
``--baseline`` it also times what the previous code did: tokenize the whole joined calib text.
Uses the embedded model's tokenizer (SmolLM2). Writes benchmarks/results/<date>_cpu_calib_data.json.

    python benchmarks/calib_data_speed.py [--baseline]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

SIZES = [(16, 512), (128, 2048), (128, 4096), (1024, 2048)]


def _tokenizer():
    from aqlmkit.formats.default_model import resolve_default_model
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_default_model())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", action="store_true", help="also time whole-text tokenization")
    args = ap.parse_args()
    tok = _tokenizer()  # before the cache moves: the model lives in the real cache
    from aqlmkit.data.calibration import calibration_batches, tokenize_docs, window_counts
    from aqlmkit.data.corpora import load_corpus

    load_s = _timed(lambda: load_corpus("default", "calib"))
    rows = []
    for n, seqlen in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["AQLMKIT_CACHE"] = tmp
            cold = _timed(lambda: calibration_batches(tok, "default", n, seqlen, seed=0))
            warm = _timed(lambda: calibration_batches(tok, "default", n, seqlen, seed=0))
        rows.append({"nsamples": n, "seqlen": seqlen, "cold_s": round(cold, 3),
                     "warm_s": round(warm, 3), "windows": window_counts("default", n, seqlen)})
        print(rows[-1])
    out = {"benchmark": "calib_data_speed", "date": dt.datetime.now(dt.timezone.utc).isoformat(),
           "host": platform.node(), "cpus": os.cpu_count(), "tokenizer": type(tok).__name__,
           "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # the machine is shared
           "corpus_load_s_first": round(load_s, 3), "runs": rows}
    if args.baseline:
        docs = load_corpus("default", "calib")
        out["baseline_whole_text_tokenize_s"] = round(_timed(lambda: tokenize_docs(tok, docs)), 3)
        out["baseline_chars"] = sum(map(len, docs))
        print("baseline", out["baseline_whole_text_tokenize_s"])
    from aqlmkit.utils import atomic_save_json

    path = Path(__file__).parent / "results" / f"{dt.date.today()}_cpu_calib_data.json"
    atomic_save_json(path, out)
    print(path)


if __name__ == "__main__":
    main()
