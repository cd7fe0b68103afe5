"""Base layer: the position vocabulary (``modality``), result files (``io``), figure and
table helpers (``display``), self-checking fast paths, the tested dependency range and the
datasets. Imports nothing else of mm_lens."""
