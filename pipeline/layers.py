"""Parse and check layer ranges (``--layers 28:38``)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class LayerRange:
    """A contiguous half-open range of CT layers ``[start, stop)``; ``k = stop - start``."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ConfigError(
                f"expected layers START:STOP with 0 <= START < STOP, got '{self.start}:{self.stop}'"
            )

    @property
    def k(self) -> int:
        """Number of layers (input channels)."""
        return self.stop - self.start

    def as_slice(self) -> slice:
        """Return the range as a ``slice`` over the z axis."""
        return slice(self.start, self.stop)

    def check(self, layers: int, where: str = "the store") -> LayerRange:
        """Return self if it fits a volume of ``layers`` layers, else raise ConfigError."""
        if self.stop > layers:
            raise ConfigError(
                f"layers {self} do not fit {where}, which has {layers} layers "
                f"(expected START:STOP with 0 <= START < STOP <= {layers})"
            )
        return self

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}"


def parse_layers(text: str) -> LayerRange:
    """Parse ``"START:STOP"`` into a :class:`LayerRange` or raise a clear ConfigError."""
    parts = str(text).strip().split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return LayerRange(int(parts[0]), int(parts[1]))
    except ValueError:
        raise ConfigError(
            f"expected layers as START:STOP with 0 <= START < STOP (e.g. 28:38), got '{text}'"
        ) from None
