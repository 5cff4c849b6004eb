"""What a store's rows are: every encoding choice, versioned in its manifest (issue 17, item 3).

A store's ``manifest["encoder"]`` names everything that shapes its vectors, so a store encoded one way
is never read, refreshed or trained on as another:

* choices that change the encoder's raw vectors: ``k``, ``pooling`` (and ``massive_factor`` for
  ``mean_skip_massive``), ``dtype``, ``max_tokens``, ``batch_tokens``, ``fixed_shapes``;
* the frozen post-transform: ``post_transform`` (``none``, ``center``, ``whiten``), ``whiten_eps`` and
  ``post_transform_sha256``, the digest of its statistics file (embeddings/post_transform.py);
* facts about the tokenizer, recorded: ``tokenizer_sha256`` (SHA-256 over the tokenizer's files),
  ``bos_prepended`` (the tokenizer puts a special token before every text, e.g. Gemma's ``<bos>`` or
  BERT's ``[CLS]``: then position 0 is that token, not the text's first word) and ``special_tokens``
  (the ``prefix`` and ``suffix`` tokens it adds).

Manifests written before these fields existed read as ``pooling`` mean, ``post_transform`` none and the
tokenizer facts unknown (None): :func:`normalised`. An unknown fact on the OLDER side (a parent store, a
run's record) is not compared, so an old store still refreshes and an old run still resumes; every
choice is always compared.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

POOLINGS = ("mean", "last", "mean_skip_first", "mean_skip_massive")  # bahe.embeddings.encoder.pool_tokens
# read for a manifest that lacks them (written before they existed)
CHOICE_DEFAULTS = {"pooling": "mean", "massive_factor": None, "post_transform": "none", "whiten_eps": None,
                   "post_transform_sha256": None}
TOKENIZER_FACTS = ("tokenizer_sha256", "bos_prepended", "special_tokens")
POST_TRANSFORM_FIELDS = ("post_transform", "whiten_eps", "post_transform_sha256")
# the files a Hugging Face tokenizer is read from (whichever of them the model folder has)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def tokenizer_sha256(model_dir: Path) -> str:
    """SHA-256 over the names and bytes of the tokenizer files in ``model_dir`` (:data:`TOKENIZER_FILES`)."""
    digest, found = hashlib.sha256(), []
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            found.append(name)
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    if not found:
        raise FileNotFoundError(f"{model_dir} holds none of the tokenizer files {list(TOKENIZER_FILES)}")
    return digest.hexdigest()


def special_tokens(tokenizer) -> dict[str, list[str]]:
    """The tokens ``tokenizer`` adds before (``prefix``) and after (``suffix``) a text, found by tokenising
    one probe text with and without special tokens."""
    probe = "Toy Story (1995)"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return {"prefix": tokenizer.convert_ids_to_tokens(full[:start]),
                    "suffix": tokenizer.convert_ids_to_tokens(full[start + len(plain):])}
    raise ValueError(f"the tokenizer changes the tokens of {probe!r} when it adds its special tokens "
                     f"({plain} -> {full}): cannot say what it adds")


def tokenizer_facts(model_dir: Path, tokenizer) -> dict:
    """``tokenizer_sha256``, ``bos_prepended`` and ``special_tokens`` of the model folder's ``tokenizer``."""
    added = special_tokens(tokenizer)
    return {"tokenizer_sha256": tokenizer_sha256(model_dir), "bos_prepended": bool(added["prefix"]),
            "special_tokens": added}


def encoder_identity(config, facts: dict) -> dict:
    """``manifest["encoder"]`` for an EncoderConfig and its tokenizer's :func:`tokenizer_facts`; the
    post-transform's digest is filled in once its statistics exist (None until then)."""
    return {"k": config.k, "pooling": config.pooling,
            "massive_factor": float(config.massive_factor) if config.pooling == "mean_skip_massive" else None,
            "dtype": config.dtype, "max_tokens": config.max_tokens, "batch_tokens": config.batch_tokens,
            "fixed_shapes": config.fixed_shapes, "post_transform": config.post_transform,
            "whiten_eps": float(config.whiten_eps) if config.post_transform == "whiten" else None,
            "post_transform_sha256": None, **{key: facts[key] for key in TOKENIZER_FACTS}}


def normalised(encoder: dict) -> dict:
    """A manifest's ``encoder`` section with the fields it predates filled in: the choices' defaults
    (:data:`CHOICE_DEFAULTS`) and None (unknown) for the tokenizer facts."""
    return {**CHOICE_DEFAULTS, **dict.fromkeys(TOKENIZER_FACTS), **encoder}


def differences(older: dict, newer: dict, *, ignore: tuple[str, ...] = ()) -> list[tuple[str, object, object]]:
    """``(field, older value, newer value)`` for each field of the two (normalised) encodings that differs;
    a tokenizer fact the older side does not know (None) is not compared, nor are the ``ignore`` fields."""
    older, newer = normalised(older), normalised(newer)
    return [(key, older.get(key), newer.get(key)) for key in sorted({*older, *newer} - set(ignore))
            if older.get(key) != newer.get(key) and not (key in TOKENIZER_FACTS and older.get(key) is None)]


def describe_choices(encoder: dict, *, defaults_too: bool = True) -> str:
    """'pooling mean_skip_massive (x4.0), post-transform whiten (eps 0.0001, stats 1a2b3c4d5e6f...)'; with
    ``defaults_too=False``, "" for a store encoded with the defaults (mean, no post-transform)."""
    enc = normalised(encoder)
    parts = []
    if defaults_too or enc["pooling"] != CHOICE_DEFAULTS["pooling"]:
        factor = f" (x{enc['massive_factor']})" if enc["massive_factor"] is not None else ""
        parts.append(f"pooling {enc['pooling']}{factor}")
    if defaults_too or enc["post_transform"] != CHOICE_DEFAULTS["post_transform"]:
        detail = [f"eps {enc['whiten_eps']}"] if enc["whiten_eps"] is not None else []
        detail += [f"stats {enc['post_transform_sha256'][:12]}..."] if enc["post_transform_sha256"] else []
        parts.append(f"post-transform {enc['post_transform']}" + (f" ({', '.join(detail)})" if detail else ""))
    return ", ".join(parts)
