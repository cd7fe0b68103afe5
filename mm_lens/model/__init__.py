"""Model layer: inputs and samples, ``HookedMLLM`` on TransformerLens' bridge, generation,
and one adapter module per architecture (``architectures/``) with its tiny offline builder
(``tiny/``). Imports only the base layer."""
