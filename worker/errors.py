"""One error tree for the whole worker.

Client-library errors are translated into these at the adapter boundary
(``raise SourceError(...) from exc``). Data errors never raise out of the
processing step: they become dead letters (see :mod:`worker.codec`).
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of every error the worker raises on purpose."""


class ConfigError(WorkerError):
    """The configuration is invalid; start-up stops (exit code 2).

    ``key`` is the dotted path of the offending setting.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class ModelSpecError(ConfigError):
    """A model specification names something that is not an allowed estimator."""


class SnapshotError(WorkerError):
    """A snapshot cannot be used: corrupt, torn, signed with another key, or of another spec."""


class CheckpointStoreError(WorkerError):
    """The checkpoint store cannot be read or written."""


class TransportError(WorkerError):
    """A source or sink failed (connection lost, broker refused, ...)."""


class SourceError(TransportError):
    """Reading from the source failed."""


class SinkError(TransportError):
    """Publishing outputs failed."""


class FencedError(TransportError):
    """Another instance took over this worker's partitions or transactional id."""
