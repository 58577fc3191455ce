"""``crm-events-producer``: a stream of realistic CRM domain events into Kafka.

Shaped like a .NET outbox: PascalCase JSON objects such as ::

    {"Type": "DealStageChanged", "Ts": "2026-11-29T10:00:00.123Z", "EventId": "<uuid4>",
     "TenantId": "t-acme", "AggregateId": "deal-1042",
     "Data": {"FromStage": "Qualification", "ToStage": "Proposal", ...}}

The record key is the AggregateId, so each aggregate's events stay in order on one partition
while traffic spreads over all of them. The events follow small life cycles: deals move through
stages to won or lost, tickets are opened, assigned and resolved, contacts are created and then
updated.

Settings (environment):

==============================  =================  ============================================
CRM_EVENTS_KAFKA_BOOTSTRAP      127.0.0.1:9092     brokers, comma-separated
CRM_EVENTS_KAFKA_TOPIC          aetherlink.events  target topic
CRM_EVENTS_PRODUCER_RATE        5                  events per second (> 0; fractions allowed)
CRM_EVENTS_PRODUCER_COUNT       0                  stop after this many events; 0 = run forever
CRM_EVENTS_PRODUCER_LOG_EVERY_S 10                 seconds between progress log lines
CRM_EVENTS_PRODUCER_SEED        (random)           seed for a reproducible event sequence
==============================  =================  ============================================

SIGTERM or SIGINT: stop producing, deliver what is buffered, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from shared import cli

__all__ = ["EventFactory", "ProducerSettings", "SettingsError", "main", "run"]

log = logging.getLogger("crm_events.producer")

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_TOPIC = "aetherlink.events"
DEFAULT_RATE_PER_S = 5.0
DEFAULT_LOG_EVERY_S = 10.0
CONNECT_TIMEOUT_S = 30.0
# Events due at once are sent as one burst; beyond this the producer is falling behind and
# drops the backlog of the schedule rather than bursting without bound.
MAX_BURST = 1000

Event = dict[str, Any]


class SettingsError(ValueError):
    """A setting has a bad value; the message is one line and names the variable."""


@dataclasses.dataclass(frozen=True)
class ProducerSettings:
    bootstrap: str = DEFAULT_BOOTSTRAP
    topic: str = DEFAULT_TOPIC
    rate_per_s: float = DEFAULT_RATE_PER_S
    count: int = 0
    log_every_s: float = DEFAULT_LOG_EVERY_S
    seed: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProducerSettings:
        def num(var: str, default: float, conv: Callable[[str], float], ok: str) -> float:
            raw = env.get(var, "").strip()
            if not raw:
                return default
            try:
                value = conv(raw)
            except ValueError:
                raise SettingsError(f"{var}: expected {ok}, got {raw!r}") from None
            return value

        rate = num("CRM_EVENTS_PRODUCER_RATE", DEFAULT_RATE_PER_S, float, "events per second > 0")
        if not (rate > 0 and math.isfinite(rate)):
            raise SettingsError(
                f"CRM_EVENTS_PRODUCER_RATE: expected events per second > 0, got {rate!r}"
            )
        count = int(num("CRM_EVENTS_PRODUCER_COUNT", 0, int, "an integer >= 0 (0 = forever)"))
        if count < 0:
            raise SettingsError(f"CRM_EVENTS_PRODUCER_COUNT: expected an integer >= 0, got {count}")
        log_every = num(
            "CRM_EVENTS_PRODUCER_LOG_EVERY_S", DEFAULT_LOG_EVERY_S, float, "seconds > 0"
        )
        if not (log_every > 0 and math.isfinite(log_every)):
            raise SettingsError(
                f"CRM_EVENTS_PRODUCER_LOG_EVERY_S: expected seconds > 0, got {log_every!r}"
            )
        raw_seed = env.get("CRM_EVENTS_PRODUCER_SEED", "").strip()
        seed = int(num("CRM_EVENTS_PRODUCER_SEED", 0, int, "an integer")) if raw_seed else None
        bootstrap = env.get("CRM_EVENTS_KAFKA_BOOTSTRAP", "").strip() or DEFAULT_BOOTSTRAP
        topic = env.get("CRM_EVENTS_KAFKA_TOPIC", "").strip() or DEFAULT_TOPIC
        return cls(bootstrap, topic, rate, count, log_every, seed)


# -- events ----------------------------------------------------------------------------------

TENANTS = ("t-acme", "t-globex", "t-initech", "t-umbrella", "t-stark")
FIRST_NAMES = (
    "Ada",
    "Grace",
    "Linus",
    "Margaret",
    "Alan",
    "Barbara",
    "Ken",
    "Frances",
    "Dennis",
    "Radia",
    "Edsger",
    "Katherine",
    "Tim",
    "Hedy",
    "John",
    "Sophie",
)
LAST_NAMES = (
    "Lovelace",
    "Hopper",
    "Torvalds",
    "Hamilton",
    "Turing",
    "Liskov",
    "Thompson",
    "Allen",
    "Ritchie",
    "Perlman",
    "Dijkstra",
    "Johnson",
    "Berners-Lee",
    "Lamarr",
)
COMPANIES = (
    "Northwind Traders",
    "Contoso Ltd",
    "Fabrikam Inc",
    "Tailspin Toys",
    "Wide World Importers",
    "Adventure Works",
    "Proseware",
    "Litware",
    "Woodgrove Bank",
)
OWNERS = ("u-alice", "u-bob", "u-carol", "u-dave", "u-erin", "u-frank")
TEAMS = ("Support L1", "Support L2", "Billing", "Onboarding")
DEAL_STAGES = ("Prospecting", "Qualification", "Proposal", "Negotiation")
LOST_REASONS = ("Price", "Competitor", "No budget", "Timing", "No decision")
TICKET_SUBJECTS = (
    "Cannot log in",
    "Invoice is wrong",
    "Export to CSV fails",
    "Feature request: dark mode",
    "Password reset email missing",
    "Sync with Outlook stopped",
    "Slow dashboard",
    "Duplicate contacts",
)
PRIORITIES = ("Low", "Normal", "High", "Urgent")
CHANNELS = ("Email", "Phone", "Portal", "Chat")
RESOLUTIONS = ("Fixed", "Answered", "Duplicate", "Won't fix", "Workaround provided")
CURRENCIES = ("EUR", "USD", "GBP")


@dataclasses.dataclass
class _Deal:
    tenant: str
    contact: str
    stage: int
    amount: float
    currency: str


@dataclasses.dataclass
class _Ticket:
    tenant: str
    contact: str
    opened_at: float
    assigned: bool = False


def _iso(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class EventFactory:
    """Makes one event per call, keeping just enough state for plausible life cycles.

    Deterministic for a given ``rng`` (and ``clock``); ids come from the same ``rng``.
    State is bounded: open deals and tickets are capped, the oldest closed first.
    """

    MAX_OPEN = 200

    def __init__(self, rng: random.Random, clock: Callable[[], float] = time.time) -> None:
        self._rng = rng
        self._clock = clock
        # A random start keeps a restarted producer from reusing the aggregate ids of the last.
        self._seq = rng.randrange(100_000, 10_000_000)
        self._contacts: list[tuple[str, str]] = []  # (tenant, contact id)
        self._deals: dict[str, _Deal] = {}
        self._tickets: dict[str, _Ticket] = {}

    def _next_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-{self._seq}"

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _event(self, type_: str, tenant: str, aggregate: str, data: Event) -> Event:
        return {
            "Type": type_,
            "Ts": _iso(self._clock()),
            "EventId": self._uuid(),
            "TenantId": tenant,
            "AggregateId": aggregate,
            "Data": data,
        }

    def __call__(self) -> Event:
        rng = self._rng
        if len(self._contacts) < 5:
            return self._contact_created()
        actions: list[tuple[Callable[[], Event], float]] = [
            (self._contact_created, 1.0),
            (self._contact_updated, 1.5),
            (self._deal_created, 1.5),
            (self._ticket_opened, 1.5),
        ]
        if self._deals:
            actions += [(self._deal_progress, 3.0)]
        if self._tickets:
            actions += [(self._ticket_progress, 2.5)]
        funcs = [f for f, _ in actions]
        make: Callable[[], Event] = rng.choices(funcs, [w for _, w in actions])[0]
        return make()

    def _contact(self) -> tuple[str, str]:
        return self._rng.choice(self._contacts)

    def _contact_created(self) -> Event:
        rng = self._rng
        tenant = rng.choice(TENANTS)
        cid = self._next_id("contact")
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        company = rng.choice(COMPANIES)
        self._contacts.append((tenant, cid))
        if len(self._contacts) > 5 * self.MAX_OPEN:
            del self._contacts[0]
        domain = company.split()[0].lower()
        return self._event(
            "ContactCreated",
            tenant,
            cid,
            {
                "FirstName": first,
                "LastName": last,
                "Email": f"{first}.{last}@{domain}.example".lower(),
                "Company": company,
                "OwnerId": rng.choice(OWNERS),
            },
        )

    def _contact_updated(self) -> Event:
        rng = self._rng
        tenant, cid = self._contact()
        changes: Event = rng.choice(
            [
                {"Phone": f"+1-555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"},
                {"Company": rng.choice(COMPANIES)},
                {"OwnerId": rng.choice(OWNERS)},
                {"LifecycleStage": rng.choice(("Lead", "MarketingQualified", "Customer"))},
            ]
        )
        return self._event("ContactUpdated", tenant, cid, {"Changes": changes})

    def _deal_created(self) -> Event:
        rng = self._rng
        tenant, contact = self._contact()
        did = self._next_id("deal")
        deal = _Deal(
            tenant, contact, 0, float(rng.randrange(1_000, 250_000, 50)), rng.choice(CURRENCIES)
        )
        self._deals[did] = deal
        if len(self._deals) > self.MAX_OPEN:
            del self._deals[next(iter(self._deals))]
        return self._event(
            "DealCreated",
            tenant,
            did,
            {
                "Name": f"{rng.choice(COMPANIES)} - {rng.choice(('Renewal', 'Expansion', 'New'))}",
                "ContactId": contact,
                "Amount": deal.amount,
                "Currency": deal.currency,
                "Stage": DEAL_STAGES[0],
                "OwnerId": rng.choice(OWNERS),
            },
        )

    def _deal_progress(self) -> Event:
        rng = self._rng
        did = rng.choice(list(self._deals))
        deal = self._deals[did]
        roll = rng.random()
        if deal.stage == len(DEAL_STAGES) - 1 and roll < 0.6:
            del self._deals[did]
            return self._event(
                "DealWon",
                deal.tenant,
                did,
                {
                    "Amount": deal.amount,
                    "Currency": deal.currency,
                    "ContactId": deal.contact,
                },
            )
        if roll < 0.12:
            del self._deals[did]
            return self._event(
                "DealLost",
                deal.tenant,
                did,
                {
                    "Reason": rng.choice(LOST_REASONS),
                    "Stage": DEAL_STAGES[deal.stage],
                },
            )
        from_stage = DEAL_STAGES[deal.stage]
        deal.stage = min(deal.stage + 1, len(DEAL_STAGES) - 1)
        if DEAL_STAGES[deal.stage] == from_stage:
            # Already in the last stage: a renegotiated amount instead of a stage change.
            deal.amount = round(deal.amount * rng.uniform(0.85, 1.1), 2)
            return self._event(
                "DealAmountChanged",
                deal.tenant,
                did,
                {
                    "Amount": deal.amount,
                    "Currency": deal.currency,
                },
            )
        return self._event(
            "DealStageChanged",
            deal.tenant,
            did,
            {
                "FromStage": from_stage,
                "ToStage": DEAL_STAGES[deal.stage],
                "Probability": round((deal.stage + 1) / (len(DEAL_STAGES) + 1), 2),
            },
        )

    def _ticket_opened(self) -> Event:
        rng = self._rng
        tenant, contact = self._contact()
        tid = self._next_id("ticket")
        self._tickets[tid] = _Ticket(tenant, contact, self._clock())
        if len(self._tickets) > self.MAX_OPEN:
            del self._tickets[next(iter(self._tickets))]
        return self._event(
            "TicketOpened",
            tenant,
            tid,
            {
                "Subject": rng.choice(TICKET_SUBJECTS),
                "Priority": rng.choice(PRIORITIES),
                "Channel": rng.choice(CHANNELS),
                "ContactId": contact,
            },
        )

    def _ticket_progress(self) -> Event:
        rng = self._rng
        tid = rng.choice(list(self._tickets))
        ticket = self._tickets[tid]
        if not ticket.assigned:
            ticket.assigned = True
            return self._event(
                "TicketAssigned",
                ticket.tenant,
                tid,
                {
                    "AssigneeId": rng.choice(OWNERS),
                    "Team": rng.choice(TEAMS),
                },
            )
        del self._tickets[tid]
        minutes = max(1, round((self._clock() - ticket.opened_at) / 60))
        return self._event(
            "TicketResolved",
            ticket.tenant,
            tid,
            {
                "Resolution": rng.choice(RESOLUTIONS),
                "ResolutionMinutes": minutes,
            },
        )


def encode(event: Event) -> tuple[bytes, bytes]:
    """(key, value) of the Kafka record for ``event``."""
    value = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    return str(event["AggregateId"]).encode(), value


# -- the loop --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Stats:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    partitions: Counter[int] = dataclasses.field(default_factory=Counter)

    def on_done(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self.failed += 1
            return
        exc = fut.exception()
        if exc is not None:
            self.failed += 1
            log.warning("event=send_failed error=%s", type(exc).__name__)
            return
        self.acked += 1
        self.partitions[int(fut.result().partition)] += 1

    def line(self) -> str:
        parts = ",".join(f"{p}:{n}" for p, n in sorted(self.partitions.items()))
        return f"sent={self.sent} acked={self.acked} failed={self.failed} partitions={parts}"


async def _start_producer(settings: ProducerSettings, stop: asyncio.Event) -> AIOKafkaProducer:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT_S
    delay = 0.5
    while True:
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap,
            client_id="crm-events-producer",
            acks="all",
            linger_ms=5,
        )
        try:
            await producer.start()
            return producer
        except KafkaConnectionError as exc:
            await producer.stop()
            if loop.time() + delay > deadline or stop.is_set():
                raise
            log.warning(
                "event=kafka_unavailable bootstrap=%s error=%s retry_in_s=%.1f",
                settings.bootstrap,
                exc,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)


async def run(settings: ProducerSettings, stop: asyncio.Event) -> int:
    """Produce until ``stop`` is set or ``settings.count`` events were sent; returns the number
    of events the broker acknowledged."""
    rng = random.Random(settings.seed)
    factory = EventFactory(rng)
    producer = await _start_producer(settings, stop)
    stats = _Stats()
    log.info(
        "event=start bootstrap=%s topic=%s rate_per_s=%g count=%d",
        settings.bootstrap,
        settings.topic,
        settings.rate_per_s,
        settings.count,
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    next_log = t0 + settings.log_every_s
    interval = 1.0 / settings.rate_per_s
    scheduled = 0  # events due by the schedule so far
    try:
        while not stop.is_set() and (settings.count == 0 or stats.sent < settings.count):
            now = loop.time()
            due = int((now - t0) * settings.rate_per_s) + 1
            if due - scheduled > MAX_BURST:
                scheduled = due - MAX_BURST
            while scheduled < due and (settings.count == 0 or stats.sent < settings.count):
                key, value = encode(factory())
                fut = await producer.send(settings.topic, value=value, key=key)
                fut.add_done_callback(stats.on_done)
                stats.sent += 1
                scheduled += 1
            if now >= next_log:
                log.info("event=progress %s", stats.line())
                next_log = now + settings.log_every_s
            wait = t0 + scheduled * interval - loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(wait, settings.log_every_s))
    finally:
        # Deliver what is buffered, then close; a second signal while flushing is ignored.
        with contextlib.suppress(KafkaError):
            await producer.flush()
        await producer.stop()
        log.info("event=stop %s", stats.line())
    return stats.acked


DESCRIPTION = (
    "Send sample CRM events (contacts, deals, tickets; keyed by aggregate over every "
    "partition) to Kafka until SIGTERM/SIGINT, or until CRM_EVENTS_PRODUCER_COUNT events are "
    "sent. Main settings: CRM_EVENTS_KAFKA_BOOTSTRAP (default 127.0.0.1:9092), "
    "CRM_EVENTS_KAFKA_TOPIC, CRM_EVENTS_PRODUCER_RATE (events per second, default 5), "
    "CRM_EVENTS_PRODUCER_COUNT (0: forever), CRM_EVENTS_PRODUCER_SEED."
)


def main(argv: Sequence[str] | None = None) -> int:
    # Arguments first: --help, --version or a typo must never start producing.
    cli.parser("crm-events-producer", DESCRIPTION).parse(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s role=producer %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        settings = ProducerSettings.from_env(os.environ)
    except SettingsError as exc:
        print(f"crm-events-producer: error: {exc}", file=sys.stderr)
        return 2

    async def amain() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run(settings, stop)
        except KafkaConnectionError as exc:
            log.error(
                "event=kafka_unavailable bootstrap=%s error=%s giving_up_after_s=%.0f",
                settings.bootstrap,
                exc,
                CONNECT_TIMEOUT_S,
            )
            return 1
        return 0

    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
