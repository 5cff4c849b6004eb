"""BAHE on TorchRec, installed under one import namespace.

The repository keeps the design card's folders at its top (``ctr_data/``, ``embeddings/``, ``model/``,
``training/``, ``serving/``, ``daily/``, ``launchers/``: the data flow text -> store -> lookup -> aggregation
-> interaction -> score, then scoring and the daily loop). This folder, ``src/bahe/``, is their namespace:
each room is a symlink here (``src/bahe/model -> ../../model``), so ``bahe.model`` is ``model/`` both for
Python (the editable install puts ``src/`` on the path) and for static tools and IDEs, and a user's own
``model.py`` or ``training/`` package never shadows them. See docs/decisions.md, "One import namespace".
"""

__version__ = "0.1.0"
