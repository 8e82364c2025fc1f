"""mergeshield: protect transformer checkpoints against unauthorized model merging."""

__version__ = "0.1.0"
