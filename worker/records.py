"""What flows between the stages, and the JSON shape of every output.

Predictions are the hot path: they are encoded straight into bytes from the step's values
(one dict and one ``orjson.dumps`` per record, no intermediate object). The low-volume
outputs (drift events, metrics reports, dead letters) are plain dicts encoded the same way.

Output shapes (one JSON object per line / message):

- prediction: ``id, key, prediction, proba (classification), score (anomaly),
  model_version, shard, position, ts``
- drift: ``event: "drift", signal, detector, shard, record_id, position, statistic,
  threshold, direction, model_version, ts``
- metrics: ``event: "metrics", shard, model_version, position, records, cumulative{...},
  rolling{...}, ts``
- dead letter: ``event: "dead_letter", reason, detail, shard, position, payload
  (or payload_base64), ts``
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: (message key, encoded value): the key is the record key (bytes) or None.
Message = tuple[bytes | None, bytes]


@dataclass
class Batch:
    """Raw messages of one shard, in source order. ``positions[i]`` is the position of ``values[i]``."""

    shard: str
    values: list[bytes]
    positions: list[int]
    timestamps: list[float | None] | None = None


@dataclass
class Outputs:
    """Everything one processed batch publishes, already encoded, in input order per kind."""

    predictions: list[Message] = field(default_factory=list)
    drift: list[Message] = field(default_factory=list)
    metrics: list[Message] = field(default_factory=list)
    dead_letters: list[Message] = field(default_factory=list)

    def extend(self, other: Outputs) -> None:
        self.predictions.extend(other.predictions)
        self.drift.extend(other.drift)
        self.metrics.extend(other.metrics)
        self.dead_letters.extend(other.dead_letters)

    def __len__(self) -> int:
        return len(self.predictions) + len(self.drift) + len(self.metrics) + len(self.dead_letters)

    def by_kind(self) -> dict[str, list[Message]]:
        """Keyed like ``outputs.*`` in the configuration."""
        return {
            "predictions": self.predictions,
            "drift": self.drift,
            "metrics": self.metrics,
            "dead_letter": self.dead_letters,
        }


def describe_event(d: dict) -> str:
    """One line for a drift-output event."""
    kind = d["event"]
    where = f"position={d['position']:<6}"
    if kind == "drift" and d["signal"] == "concept":
        return (f"DRIFT       {where} concept drift ({d['detector']}, {d['direction']}: "
                f"error {d['previous']:.3f} -> {d['statistic']:.3f}) model v{d['model_version']}")
    if kind in ("drift", "drift_cleared"):
        what = f"feature {d['feature']}" if d.get("feature") else "predictions"
        return (f"{kind.upper():<11} {where} {d['signal']} drift on {what} "
                f"({d['detector']} {d['statistic']:.3f} vs {d['threshold']:.3f})")
    if kind == "promotion":
        return (f"PROMOTION   {where} challenger promoted: v{d['previous_version']} -> v{d['model_version']} "
                f"(accuracy {d['champion_score']:.3f} -> {d['challenger_score']:.3f})")
    return f"{kind.upper():<11} {where} model v{d['model_version']}"
