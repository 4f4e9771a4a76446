"""One direction of an emulated WAN link, and its text form ``rtt=100ms,rate=1gbit,loss=0.01%``."""

from __future__ import annotations

import dataclasses
import re

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_RATE_UNITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*$")
_NANOS_PER_SECOND = 10**9


def _split(text: str, key: str) -> tuple[float, str]:
    m = _NUMBER.match(text.lower())
    if not m:
        raise ValueError(f"{key}: '{text}' is not a non-negative number with an optional unit")
    return float(m.group(1)), m.group(2)


def _scaled(text: str, key: str, units: dict[str, float]) -> float:
    value, unit = _split(text, key)
    if unit not in units:
        allowed = ", ".join(u for u in units if u) + (" (or none)" if "" in units else "")
        raise ValueError(f"{key}: unknown unit '{unit}' in '{text}'; use {allowed}")
    return value * units[unit]


def _loss(text: str) -> float:
    value, unit = _split(text, "loss")
    if unit not in ("", "%"):
        raise ValueError(f"loss: '{text}' is a fraction (0.001) or a percentage (0.1%)")
    fraction = value / 100 if unit == "%" else value
    if fraction > 1:
        raise ValueError(f"loss: '{text}' is more than 100%")
    return fraction


# How __str__ writes each field, in the order the text form lists them.
_TEXT_FORMS = (
    ("rtt", lambda v: f"{v * 1e3:g}ms"),
    ("rate", lambda v: f"{v / 1e6:g}mbit"),
    ("loss", lambda v: f"{v * 100:g}%"),
    ("queue", lambda v: f"{v}b"),
    ("flow", lambda v: f"{v / 1e6:g}mbit"),
    ("flow_queue", lambda v: f"{v}b"),
)


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """One direction src -> dst. Zero means "none": no delay, no rate limit, no loss, no flow cap.

    The round trip between two hosts is half of each direction's ``rtt``, so a symmetric pair
    measures ``rtt``. ``queue`` and ``flow_queue`` of 0 mean one bandwidth-delay product of the link
    rate and of the flow cap (at least 256 KiB and 128 KiB).
    """

    rtt: float = 0.0  # seconds
    rate: int = 0  # bit/s through the link's bottleneck queue
    loss: float = 0.0  # fraction of packets dropped at random
    queue: int = 0  # bytes the bottleneck holds before it drops (tail drop)
    flow: int = 0  # bit/s cap of each TCP/UDP 5-tuple, with its own queue
    flow_queue: int = 0  # bytes

    _KEYS = ("rtt", "rate", "loss", "queue", "flow", "flow_queue")

    def __post_init__(self):
        for key in self._KEYS:
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must not be negative")
        if self.loss > 1:
            raise ValueError("loss is a fraction in [0, 1]")

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``"rtt=100ms,rate=1gbit,loss=0.01%,flow=100mbit,queue=4mb"``; missing keys mean none."""
        parsers = {
            "rtt": lambda v: _scaled(v, "rtt", _TIME_UNITS),
            "rate": lambda v: int(_scaled(v, "rate", _RATE_UNITS)),
            "loss": _loss,
            "queue": lambda v: int(_scaled(v, "queue", _SIZE_UNITS)),
            "flow": lambda v: int(_scaled(v, "flow", _RATE_UNITS)),
            "flow_queue": lambda v: int(_scaled(v, "flow_queue", _SIZE_UNITS)),
        }
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not sep or key not in parsers:
                raise ValueError(f"'{item}': expected key=value with key one of {', '.join(parsers)}")
            if key in values:
                raise ValueError(f"'{key}' given twice")
            values[key] = parsers[key](value)
        return cls(**values)

    @classmethod
    def of(cls, spec: LinkSpec | str | None) -> LinkSpec:
        if spec is None:
            return cls()
        return spec if isinstance(spec, LinkSpec) else cls.parse(spec)

    def __str__(self) -> str:
        """The text form (what ``parse`` reads), fields that are zero left out."""
        return ",".join(f"{key}={text(getattr(self, key))}" for key, text in _TEXT_FORMS if getattr(self, key))

    def delay_line_arg(self) -> str:
        """The same spec in the delay line's base units (see csrc/wan/config.hpp)."""
        return (
            f"delay_ns={round(self.rtt * _NANOS_PER_SECOND / 2)},rate_bps={self.rate},loss={self.loss!r},"
            f"queue_bytes={self.queue},flow_rate_bps={self.flow},flow_queue_bytes={self.flow_queue}"
        )
