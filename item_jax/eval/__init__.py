"""Evaluation: split embeddings, exact top-k search, retrieval and category
metrics, baselines, reports."""
