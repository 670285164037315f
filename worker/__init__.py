"""A streaming online-learning worker: river models learning test-then-train from a stream."""

__version__ = "0.1.0"
