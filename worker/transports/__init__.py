"""Transports: one Source/Sink protocol (base.py), one implementation per file.

Only ``kafka.py`` imports confluent_kafka and only ``rabbitmq.py`` imports pika.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.monitoring.telemetry import Telemetry
    from worker.transports.base import Sink, Source


def open_transport(settings: Settings, telemetry: Telemetry) -> tuple[Source, Sink]:
    """The configured source and the sink that goes with it (client libraries load lazily)."""
    src = settings.source
    if src.type == "file":
        from worker.transports.file import FileSink, FileSource

        assert src.file is not None
        return (
            FileSource(src.file.path, src.file.follow, src.file.poll_seconds),
            FileSink(settings.outputs.model_dump()),
        )
    if src.type == "rabbitmq":
        from worker.transports.rabbitmq import open_rabbitmq  # noqa: PLC0415

        return open_rabbitmq(settings, telemetry)
    from worker.transports.kafka import open_kafka  # noqa: PLC0415

    return open_kafka(settings, telemetry)
