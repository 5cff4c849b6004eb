"""BAHE on TorchRec, installed under one import namespace.

The repository keeps the design card's folders at its top (``model/``, ``embeddings/``, ...: the data
flow text -> store -> lookup -> aggregation -> interaction -> score); the package installs and imports
them as ``bahe.model``, ``bahe.embeddings``, ``bahe.training``, ``bahe.launchers`` and ``bahe.ctr_data``
(pyproject.toml's ``package-dir`` mapping), so a user's own ``model.py`` or ``training/`` package
never shadows them. See docs/decisions.md, "One import namespace".
"""

__version__ = "0.1.0"
