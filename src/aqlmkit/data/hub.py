"""Standard LM benchmark corpora through ``datasets.load_dataset`` (needs a reachable hub or a
populated HF cache). The table keeps the usual names/configs used by GPTQ/AQLM; tests point it at
local files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from aqlmkit.errors import AqlmkitError


@dataclass
class HubSpec:
    path: str
    name: str | None
    splits: dict[str, str]  # our split (calib/eval) -> dataset split expression
    text_field: str = "text"
    data_files: dict[str, str] | None = None
    kwargs: dict = field(default_factory=dict)


_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz",
             "validation": "en/c4-validation.00000-of-00008.json.gz"}
HUB_DATASETS: dict[str, HubSpec] = {
    "wikitext2": HubSpec("wikitext", "wikitext-2-raw-v1", {"calib": "train", "eval": "test"}),
    "ptb": HubSpec("ptb_text_only", "penn_treebank", {"calib": "train", "eval": "test"},
                   text_field="sentence"),
    "c4": HubSpec("allenai/c4", None, {"calib": "train", "eval": "validation[:1100]"},
                  data_files=_C4_FILES),
    # RedPajama is calibration data in the AQLM paper; its eval split is a held-out slice.
    "redpajama": HubSpec("togethercomputer/RedPajama-Data-1T-Sample", None,
                         {"calib": "train[:90%]", "eval": "train[90%:]"}),
}


def hub_docs(name: str, split: str) -> list[str]:
    """Rows of the dataset's text field; any loading failure becomes one AqlmkitError."""
    spec = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError as e:
        raise AqlmkitError(f"corpus {name!r} needs the 'datasets' package: "
                           "pip install 'aqlmkit[eval]'") from e
    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.splits[split],
                                   data_files=spec.data_files, **spec.kwargs)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFound, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AqlmkitError(f"corpus {name!r} ({spec.path}) is unavailable: {first}; it needs the "
                           "Hugging Face hub or a local HF datasets cache. Offline, use a "
                           "built-in corpus (default, ood, pydoc, kjv, sotu, factbook) or a "
                           ".txt/.jsonl file") from e
    if spec.text_field not in ds.column_names:
        raise AqlmkitError(f"corpus {name!r} has no {spec.text_field!r} column "
                           f"(columns: {ds.column_names})")
    return [t for t in ds[spec.text_field] if isinstance(t, str)]
