"""`balance: auto` for sync mode: size each worker's batch by its measured throughput.

The server keeps a smoothed samples/s per worker host (from the forward/backward time each
worker reports with its gradients) and splits the step's global batch, num_active · batch_size,
in proportion to it, so that every worker's compute takes about as long. Each worker draws its
samples from a cursor into its shard's stream of seeded epochs (ShardLoader.take); the server
keeps the cursors, so a worker that reconnects continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMOOTHING = 0.3  # weight of the newest measurement in the moving average


def split_batch(total: int, rates: list[float | None]) -> list[int]:
    """Integers >= 1 summing to `total`, proportional to `rates` (None: not measured yet).

    Unmeasured workers count at the mean of the measured ones (all equal when none is).
    Everyone first gets 1 sample; the rest is shared out by largest remainder, ties going to
    the lower index, so the split is a pure function of its inputs.
    """
    count = len(rates)
    if count == 0:
        return []
    if total < count:
        raise ValueError(f"cannot give {count} workers at least one of {total} samples")
    known = [r for r in rates if r is not None and r > 0]
    fill = sum(known) / len(known) if known else 1.0
    weights = [r if r is not None and r > 0 else fill for r in rates]
    rest = total - count
    whole = sum(weights)
    ideal = [rest * w / whole for w in weights]
    sizes = [1 + int(x) for x in ideal]
    short = total - sum(sizes)
    by_remainder = sorted(range(count), key=lambda i: (-(ideal[i] - int(ideal[i])), i))
    for i in by_remainder[:short]:
        sizes[i] += 1
    return sizes


@dataclass
class Balancer:
    """Per-host throughput estimates and sample cursors, kept by the server."""

    batch_size: int
    rates: dict[str, float] = field(default_factory=dict)  # host -> smoothed samples/s
    cursors: dict[str, int] = field(default_factory=dict)  # host -> next sample of its stream

    def observe(self, host: str, samples: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = samples / seconds
        old = self.rates.get(host)
        self.rates[host] = rate if old is None else SMOOTHING * rate + (1 - SMOOTHING) * old

    def cursor(self, host: str, step: int) -> int:
        """Where host's next batch starts; a first-time joiner at `step` starts where it would
        be had it drawn batch_size samples every step so far."""
        return self.cursors.setdefault(host, step * self.batch_size)

    def advance(self, host: str, samples: int) -> None:
        self.cursors[host] = self.cursors.get(host, 0) + samples

    def split(self, hosts: list[str]) -> list[int]:
        """Batch sizes for `hosts` (in rank order) summing to len(hosts) · batch_size."""
        return split_batch(len(hosts) * self.batch_size, [self.rates.get(h) for h in hosts])
