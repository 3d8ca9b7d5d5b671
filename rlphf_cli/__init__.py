"""rlphf: personalized alignment by post-hoc parameter merging (Personalized Soups)."""

__version__ = "0.1.0"
