"""A refill landing between two of the replay's reads must not open a silent gap.

Found by the wiped-Redis fault test (tests/integration/test_failover.py): a client resuming
behind the hub while ingest refilled a wiped Redis lost the events between its cursor and the
hub's position, without a reset. The replay had found nothing after the cursor, then read the
partition's state, which the refill had meanwhile moved past the hub: "nothing lies there".
Here the refill runs exactly between those two reads."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from edge.bus_memory import MemoryBus
from edge.hub import Client, Hub
from edge.lru import ByteLru
from edge.metrics import EdgeMetrics
from edge.replay import Resumer
from shared.contract import PartitionState
from shared.cursor import Cursor
from tests.unit.test_resume import EPOCH, PAGE, ListWriter, event, seqs


class RefillDuringStateRead(MemoryBus):
    """Ingest re-applies the rolled-back records just before the state is read, once."""

    refill_armed = False

    async def state(self, partition: int) -> PartitionState | None:
        if self.refill_armed:
            self.refill_armed = False
            self.ingest(partition)
        return await super().state(partition)


async def test_a_refill_between_the_stream_probe_and_the_state_read_is_replayed() -> None:
    bus = RefillDuringStateRead(maxlen=1000)
    written = bus.publish([event(i) for i in range(1, 21)])
    hub = Hub(ring_bytes=0)
    hub.start(EPOCH, [0])
    hub.dispatch(written)
    bus.rollback(0, applied=9)  # Redis holds 1..10; the hub dispatched 1..20
    metrics = EdgeMetrics(CollectorRegistry(), "test")
    r = Resumer(bus, hub, metrics, PAGE, ByteLru(1 << 20), refill_wait_s=10.0)
    plan = await r.plan(Cursor(EPOCH, (12,)))  # nothing after 12 in Redis: behind the hub
    assert plan.resets == []
    bus.refill_armed = True
    client = Client(None, 1 << 20, lambda: None)
    writer = ListWriter()
    await r.replay(plan, client, hub.attach(client, plan.cursor), writer)
    frames = writer.frames()
    assert [f for f in frames if f.event == "reset"] == []
    assert seqs(frames) == list(range(13, 21))
