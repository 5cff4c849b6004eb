"""Serving a trained BAHE run: cached text features, an exported predictor (docs/serving.md)."""
