"""Analyses: logit lens, activation patching, attention metrics and knockout, similarity,
evaluation by generation and teacher forcing, convergence. Imports neurons, model and base."""
