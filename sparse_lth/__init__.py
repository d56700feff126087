"""sparse-lth: lottery tickets by iterative magnitude pruning, trained sparse."""
__version__ = "0.1.0"
