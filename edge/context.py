"""Everything the edge's handlers need, built once per app and stored under one AppKey."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import EdgeSettings

from .bus import Bus
from .hub import Hub
from .metrics import EdgeMetrics
from .subscription import Subscription


@dataclass(slots=True)
class EdgeContext:
    settings: EdgeSettings
    metrics: EdgeMetrics
    hub: Hub
    bus: Bus
    subscription: Subscription
    shutting_down: bool = False
