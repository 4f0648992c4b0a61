"""DCL Store: a distributed, strongly consistent, append-only commit log."""

__version__ = "0.1.0"
