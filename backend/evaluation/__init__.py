"""Evaluation: zero-shot top-1, image-text retrieval recall, semantic-localization (SeLo) metrics."""
