"""cpsample_fast: fast, tested CPSample (Kazdan et al., ICLR 2025, arXiv 2409.07025).

Public names follow SPEC.md §5.
"""

__version__ = "0.1.0"
