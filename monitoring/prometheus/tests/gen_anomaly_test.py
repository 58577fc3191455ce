"""Writes anomaly_test.yml beside this file: the promtool tests of crm_events_anomaly.yml.

    python3 monitoring/prometheus/tests/gen_anomaly_test.py          # rewrite anomaly_test.yml
    python3 monitoring/prometheus/tests/gen_anomaly_test.py --check  # exit 1 if it differs

The detector needs more than a week of history, and PromQL's series notation has no sine: the
traffic is generated here, hour by hour, as a daily cycle (business hours against nights), a
weekly one (quieter weekends) and a little noise from a seeded generator, so the file is the
same on every run (tests/monitoring/test_anomaly.py checks that the committed file is this
script's output). Each hour's level is constant, so every counter is a run of ``a+bxN``
segments and every gauge a run of ``axN``.

One input sample a minute (rate()'s 5-minute window needs two); rules evaluated every 30
minutes, which keeps promtool's run short (its time grows with the number of evaluations of
every loaded rule, the recording rules' included) and still gives each 1-hour window 3
samples and each weekly one 337.

What the z-scores here show is the logic (which weeks predict, how they vote, when the floors
apply, when an alert fires), not how sensitive the detector is in production. Production
evaluates every 15 seconds, so the weekly standard deviation of the error comes from 120 times
as many samples, and real traffic varies within the hour, where this traffic is smooth: the
same incident gets a different z-score there.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().with_name("anomaly_test.yml")

HOUR = 60  # minutes
DAY = 24 * HOUR
EVAL_MINUTES = 30
RUNBOOK = "https://github.com/aetherlink/crm-events/blob/main/monitoring/runbooks.md"
ALERTS = ("CrmEventsTrafficAnomaly", "CrmEventsClientsAnomaly")
TRAFFIC_Z = "job:crm_events_messages:flow_rate5m_zscore"
CLIENTS_Z = "job:crm_events_sse_clients:sum_zscore"
EDGE_JOB, INGEST_JOB = "crm-events-edge", "crm-events-ingest"
BOTH = (EDGE_JOB, INGEST_JOB)
EDGE = f'job="{EDGE_JOB}"'
INGEST = f'job="{INGEST_JOB}"'

#: Events per second and SSE clients at the daily average of a weekday.
EVENTS = 100.0
CLIENTS = 400.0


# -- traffic, hour by hour ----------------------------------------------------------------------


def daily(hour_of_day: int) -> float:
    """Business hours: peak at 15:00 (1.6x), trough at 03:00 (0.4x); the hour's midpoint."""
    return 1 + 0.6 * math.sin(2 * math.pi * (hour_of_day + 0.5 - 9) / 24)


def weekly(day: int) -> float:
    """Day 0 is a Monday; Saturday and Sunday carry 60% of a weekday."""
    return 0.6 if day % 7 in (5, 6) else 1.0


@dataclass
class Traffic:
    """Hourly levels of the two signals of one scenario: events per second through the
    pipeline, and SSE clients connected to all edges together."""

    events: list[float]
    clients: list[float]

    @classmethod
    def seasonal(cls, days: float, seed: int, growth_per_day: float = 0.0) -> Traffic:
        rng = random.Random(seed)
        events, clients = [], []
        for h in range(round(days * 24)):
            day, hour = divmod(h, 24)
            level = daily(hour) * weekly(day) * (1 + growth_per_day) ** (h / 24)
            # +-4% noise, independent for each hour and signal
            events.append(EVENTS * level * rng.uniform(0.96, 1.04))
            clients.append(CLIENTS * level * rng.uniform(0.96, 1.04))
        return cls(events, clients)

    @classmethod
    def constant(cls, days: float, events: float, clients: float) -> Traffic:
        hours = round(days * 24)
        return cls([events] * hours, [clients] * hours)

    def scale(self, start_h: int, end_h: int, events: float, clients: float) -> Traffic:
        """Multiply the hours [start_h, end_h) by a factor per signal."""
        for h in range(start_h, min(end_h, len(self.events))):
            self.events[h] *= events
            self.clients[h] *= clients
        return self


# -- series notation ----------------------------------------------------------------------------


def encode(values: Sequence[int]) -> str:
    """Values as runs of ``a+bxN`` (N+1 values from a, step b) and ``axN`` (constant)."""
    parts: list[str] = []
    i, n = 0, len(values)
    while i < n:
        if i == n - 1:
            parts.append(str(values[i]))
            break
        step = values[i + 1] - values[i]
        k = i + 1
        while k + 1 < n and values[k + 1] - values[k] == step:
            k += 1
        if step == 0:
            parts.append(f"{values[i]}x{k - i}")
        elif step > 0:
            parts.append(f"{values[i]}+{step}x{k - i}")
        else:
            parts.append(f"{values[i]}-{-step}x{k - i}")
        i = k + 1
    return " ".join(parts)


def counter(per_minute: Callable[[int], int], hours: int) -> list[int]:
    """A counter sampled every minute for ``hours``: the sample at minute m counts the events
    of the minutes before m."""
    values = [0]
    for m in range(hours * HOUR):
        values.append(values[-1] + per_minute(m // HOUR))
    return values


def gauge(level: Callable[[int], int], hours: int) -> list[int]:
    """A gauge sampled every minute: the sample at minute m holds the level of m's hour."""
    return [level(min(m // HOUR, hours - 1)) for m in range(hours * HOUR + 1)]


def input_series(traffic: Traffic) -> list[tuple[str, str]]:
    """Two ingest workers sharing the events, two edges that each receive all of them, and the
    clients split over the two edges."""
    hours = len(traffic.events)
    per_min = [round(e * 60) for e in traffic.events]
    clients = [round(c) for c in traffic.clients]
    return [
        (
            f'crm_events_messages_total{{{INGEST}, instance="ingest1:9020"}}',
            encode(counter(lambda h: per_min[h] // 2, hours)),
        ),
        (
            f'crm_events_messages_total{{{INGEST}, instance="ingest2:9020"}}',
            encode(counter(lambda h: per_min[h] - per_min[h] // 2, hours)),
        ),
        (
            f'crm_events_messages_total{{{EDGE}, instance="edge1:9011"}}',
            encode(counter(lambda h: per_min[h], hours)),
        ),
        (
            f'crm_events_messages_total{{{EDGE}, instance="edge2:9012"}}',
            encode(counter(lambda h: per_min[h], hours)),
        ),
        (
            f'crm_events_sse_clients{{{EDGE}, instance="edge1:9011"}}',
            encode(gauge(lambda h: clients[h] - clients[h] // 2, hours)),
        ),
        (
            f'crm_events_sse_clients{{{EDGE}, instance="edge2:9012"}}',
            encode(gauge(lambda h: clients[h] // 2, hours)),
        ),
    ]


# -- test cases ---------------------------------------------------------------------------------


def at(day: int, hour: int = 0, minute: int = 0) -> str:
    """A promtool eval_time."""
    out = f"{day}d" if day else ""
    out += f"{hour}h" if hour else ""
    out += f"{minute}m" if minute or not out else ""
    return out


#: A promql_expr_test: expression, eval_time, expected (labels, value) samples.
Expr = tuple[str, str, list[tuple[str, str]]]


@dataclass
class Firing:
    alert: str
    job: str
    zscore: str  # as the description prints it (%+.1f)


@dataclass
class Group:
    name: str
    comment: str
    traffic: Traffic
    quiet: list[tuple[str, str]] = field(default_factory=list)  # (eval_time, alert)
    firing: list[tuple[str, Firing]] = field(default_factory=list)
    exprs: list[Expr] = field(default_factory=list)


def description(f: Firing) -> str:
    below = f.zscore.startswith("-")
    if f.alert == "CrmEventsTrafficAnomaly":
        return (
            f"z-score {f.zscore}: the event rate through {f.job} has been "
            f"{'below' if below else 'above'} what the same hour of past weeks predicts by more "
            "than 3 standard deviations for 15 minutes."
        )
    return (
        f"z-score {f.zscore}: the SSE clients connected to {f.job} have been "
        f"{'fewer' if below else 'more'} than the same hour of past weeks predicts by more than 3 "
        "standard deviations for 15 minutes."
    )


SUMMARY = {
    "CrmEventsTrafficAnomaly": "The event rate through crm-events is far from what the same "
    "hour of past weeks predicts.",
    "CrmEventsClientsAnomaly": "The number of connected SSE clients is far from what the same "
    "hour of past weeks predicts.",
}


def never_pending(window: str, eval_time: str) -> Expr:
    """Neither alert was pending or firing at any evaluation of the last ``window``."""
    return (f'count_over_time(ALERTS{{alertname=~"{"|".join(ALERTS)}"}}[{window}])', eval_time, [])


def max_abs_zscore(metric: str, window: str, eval_time: str, expected: dict[str, str]) -> Expr:
    """The largest |z| of the last ``window``, to one decimal."""
    return (
        f"round(max_over_time(abs({metric})[{window}:{EVAL_MINUTES}m]), 0.1)",
        eval_time,
        [(f'{{job="{job}"}}', value) for job, value in expected.items()],
    )


def render(groups: Sequence[Group]) -> str:
    out = [HEADER]
    for g in groups:
        out.append("")
        out.extend(f"  # {line}".rstrip() for line in g.comment.strip().splitlines())
        out.append(f"  - name: '{g.name}'")
        out.append("    interval: 1m")
        out.append("    input_series:")
        for series, values in input_series(g.traffic):
            out.append(f"      - series: '{series}'")
            out.append(f"        values: '{values}'")
        # one case per eval_time and alert, with every alert expected then (none: quiet)
        cases: dict[tuple[str, str], list[Firing]] = {(t, a): [] for t, a in g.quiet}
        for t, f in g.firing:
            cases.setdefault((t, f.alert), []).append(f)
        if cases:
            out.append("    alert_rule_test:")
        for (eval_time, alert), firing in sorted(
            cases.items(), key=lambda c: (_minutes(c[0][0]), c[0][1])
        ):
            out.append(f"      - eval_time: {eval_time}")
            out.append(f"        alertname: {alert}")
            if not firing:
                out.append("        exp_alerts: []")
                continue
            out.append("        exp_alerts:")
            for f in firing:
                out.append("          - exp_labels:")
                out.append("              severity: warning")
                out.append("              service: crm-events")
                out.append(f"              job: {f.job}")
                out.append("            exp_annotations:")
                out.append(f"              summary: {json.dumps(SUMMARY[alert])}")
                out.append(f"              description: {json.dumps(description(f))}")
                out.append(f"              runbook_url: {RUNBOOK}#{alert.lower()}")
        if g.exprs:
            out.append("    promql_expr_test:")
        for expr, eval_time, samples in g.exprs:
            out.append(f"      - expr: '{expr}'")
            out.append(f"        eval_time: {eval_time}")
            if not samples:
                out.append("        exp_samples: []")
                continue
            out.append("        exp_samples:")
            for labels, value in samples:
                out.append(f"          - labels: '{labels}'")
                out.append(f"            value: {value}")
    return "\n".join(out) + "\n"


def _minutes(eval_time: str) -> int:
    total, num = 0, ""
    for ch in eval_time:
        if ch.isdigit():
            num += ch
            continue
        total += int(num) * {"d": DAY, "h": HOUR, "m": 1}[ch]
        num = ""
    return total


HEADER = """\
# promtool test rules: monitoring/prometheus/rules/crm_events_anomaly.yml.
# GENERATED by gen_anomaly_test.py beside this file: edit that script, then run
# `python3 gen_anomaly_test.py` (tests/monitoring/test_anomaly.py fails while the two differ).
#
# Each group is a deployment with two ingest workers and two edges, one input sample a minute,
# for up to 23 days. Day 0 is a Monday; the traffic has a daily cycle (business hours 1.6x,
# nights 0.4x of the daily average), quieter weekends (0.6x) and +-4% hourly noise. The
# detector predicts from the same hour of past weeks, so it judges nothing before day 8; it
# has 2 weeks to compare with from day 15, 3 from day 22.
# Rules are evaluated every 30 minutes: promtool's time grows with the number of evaluations
# of every loaded rule, and this keeps the whole file to about 12 s.
#
# The z-scores below show the logic, not the detector's sensitivity in production: there,
# rules are evaluated every 15 s (the error's weekly standard deviation comes from 120 times as
# many samples) on traffic that varies within the hour, where this traffic is smooth and
# constant within each hour. The same incident gets a different z-score there.
rule_files:
  - ../rules/crm_events_recording.yml
  - ../rules/crm_events_anomaly.yml

evaluation_interval: 30m

# Recorded series are read at the timestamp they are written (30 minutes is longer than the
# 5-minute lookback), so each group runs after the groups it reads.
group_eval_order:
  - crm_events_traffic
  - crm_events_anomaly_traffic
  - crm_events_anomaly_clients
  - crm_events_anomaly_alerts

tests:"""


#: Each signal, with a zero for each of its series.
SIGNALS = {
    "job:crm_events_messages:flow_rate5m": [(f'{{job="{j}"}}', "0") for j in BOTH],
    "job:crm_events_sse_clients:sum": [(f'{{job="{EDGE_JOB}"}}', "0")],
}


def per_week(signal: str, weeks: int) -> str:
    """The prediction from ``weeks`` ago, as the rule writes it (its history guard aside)."""
    return (
        f"(avg_over_time({signal}[1h] offset {weeks * 168 - 1}h30m)"
        f" + {signal}_avg1d - {signal}_avg1d offset {weeks}w)"
    )


def weekly_errors(signal: str) -> str:
    """The signal minus each week's prediction (label weeks_ago), before the vote."""
    return f"{signal} - ignoring (weeks_ago) group_right () {signal}_prediction"


def rounded(expr: str, eval_time: str, samples: dict[str, str]) -> Expr:
    """``expr`` to one decimal."""
    return (f"round({expr}, 0.1)", eval_time, list(samples.items()))


#: The errors against the weeks 1, 2 (and 3) ago, and the error they agree on.
Votes = tuple[list[str], str]


def quiet_at(*times: str) -> list[tuple[str, str]]:
    return [(t, alert) for t in times for alert in ALERTS]


#: The incidents of the three weeks' scenario, two hours each: (day, first hour, factor of the
#: events, factor of the clients).
INCIDENTS = (
    (8, 10, 0.3, 2.0),  # judged by 1 week (day 1); returns as an echo on day 15
    (15, 14, 3.0, 0.2),  # judged by 2 weeks (days 8 and 1); returns as an echo on day 22
    (15, 17, 3.0, 0.2),  # the same, 3 hours later; recurs on day 22
    (22, 17, 3.0, 0.2),  # the recurrence: judged by 3 weeks, days 8 and 1 outvote day 15
)


def three_weeks() -> Group:
    """Three weeks of growing traffic with incidents, judged by 1, 2 and 3 past weeks: each
    alert fires up and down, and neither fires on the echo of an incident a week later, with 2
    weeks of history as with 3."""
    traffic = Traffic.seasonal(22 + 19 / 24, seed=1, growth_per_day=0.03)
    for day, hour, events, clients in INCIDENTS:
        traffic.scale(day * 24 + hour, day * 24 + hour + 2, events=events, clients=clients)
    m, c = "job:crm_events_messages:flow_rate5m", "job:crm_events_sse_clients:sum"

    def votes(eval_time: str, events: Votes, clients: Votes) -> list[Expr]:
        """Each week's error (the signal minus that week's prediction), then the error the
        weeks agree on (the record the z-score divides)."""
        weekly = {
            f'{{job="{job}", weeks_ago="{k}"}}': v
            for job in BOTH
            for k, v in enumerate(events[0], start=1)
        }
        clients_weekly = {
            f'{{job="{EDGE_JOB}", weeks_ago="{k}"}}': v for k, v in enumerate(clients[0], start=1)
        }
        return [
            rounded(weekly_errors(m), eval_time, weekly),
            rounded(f"{m}_error", eval_time, {f'{{job="{j}"}}': events[1] for j in BOTH}),
            rounded(weekly_errors(c), eval_time, clients_weekly),
            rounded(f"{c}_error", eval_time, {f'{{job="{EDGE_JOB}"}}': clients[1]}),
        ]

    return Group(
        name="anomaly: three weeks of growing traffic; an incident does not echo a week later",
        comment="""
-- three weeks: growth, incidents, echoes ------------------------------------------------
The daily and weekly cycle growing 3% a day (+23% a week, x1.9 over the 22 days): each
week's prediction adds the growth since. Incidents of 2 hours (events, clients):
  day 8  (Tue) 10-12  x0.3  x2.0  judged by 1 week (day 1): fires, down and up
  day 15 (Tue) 14-16  x3.0  x0.2  judged by 2 weeks (days 8, 1), which agree: fires
  day 15 (Tue) 17-19  x3.0  x0.2  the same
  day 22 (Tue) 17-19  x3.0  x0.2  day 15 predicts it, days 8 and 1 do not: 2 of 3, fires
The echoes, normal traffic at the hour of an incident a week earlier:
  day 15 10-12: the prediction from day 8 expects the incident, the one from day 1 does not.
    The clients' two errors have opposite signs: 0 counts. The events' are both positive, one
    small: the smaller counts. (A mean of the two predictions fires here on the events, z
    up to +4.2.)
  day 22 14-16: day 15 expects the incident, days 8 and 1 do not: the median is normal.
Never pending outside the incidents from 8d12h30m (weekend included) and from 15d19h30m.
The one week of day 8 has had a standard deviation of the error for only 10 hours, so the
z-scores there are small for the size of the incident.

An anomaly is pending from the first evaluation that sees it (a gauge at once, a 5-minute
rate 30 minutes later) and fires at the next (for: 15m); the z-scores are those promtool
computes for this data.""",
        traffic=traffic,
        quiet=[
            *quiet_at(at(8, 9, 30), at(12, 15), at(14, 9)),
            (at(8, 10), "CrmEventsClientsAnomaly"),  # pending
            (at(8, 10, 30), "CrmEventsTrafficAnomaly"),  # pending
            # the echo of day 8, with 2 weeks of history
            *quiet_at(at(15, 10, 30), at(15, 11), at(15, 11, 30), at(15, 12)),
            (at(15, 14), "CrmEventsClientsAnomaly"),
            (at(15, 14, 30), "CrmEventsTrafficAnomaly"),
            # the echo of day 15, with 3 weeks
            *quiet_at(at(22, 14, 30), at(22, 15), at(22, 15, 30), at(22, 16)),
            (at(22, 17), "CrmEventsClientsAnomaly"),
            (at(22, 17, 30), "CrmEventsTrafficAnomaly"),
        ],
        firing=[
            (at(8, 10, 30), Firing("CrmEventsClientsAnomaly", EDGE_JOB, "+3.1")),
            *[(at(8, 11), Firing("CrmEventsTrafficAnomaly", job, "-3.9")) for job in BOTH],
            (at(15, 14, 30), Firing("CrmEventsClientsAnomaly", EDGE_JOB, "-8.9")),
            *[(at(15, 15), Firing("CrmEventsTrafficAnomaly", job, "+12.3")) for job in BOTH],
            (at(22, 17, 30), Firing("CrmEventsClientsAnomaly", EDGE_JOB, "-6.1")),
            *[(at(22, 18), Firing("CrmEventsTrafficAnomaly", job, "+8.7")) for job in BOTH],
        ],
        exprs=[
            never_pending("7d1h", at(15, 13, 30)),
            max_abs_zscore(TRAFFIC_Z, "7d1h", at(15, 13, 30), dict.fromkeys(BOTH, "2.4")),
            max_abs_zscore(CLIENTS_Z, "7d1h", at(15, 13, 30), {EDGE_JOB: "2.3"}),
            never_pending("6d21h", at(22, 16, 30)),
            max_abs_zscore(TRAFFIC_Z, "6d21h", at(22, 16, 30), dict.fromkeys(BOTH, "1.5")),
            max_abs_zscore(CLIENTS_Z, "6d21h", at(22, 16, 30), {EDGE_JOB: "2.3"}),
            # a prediction for each week that exists, each as the rule's header writes it
            *[
                (
                    f"count without (weeks_ago) ({s}_prediction)",
                    eval_time,
                    [(lab, n) for lab, _ in samples],
                )
                for s, samples in SIGNALS.items()
                for eval_time, n in ((at(14, 23, 30), "1"), (at(21, 23, 30), "2"), (at(22, 9), "3"))
            ],
            *[
                (
                    f'round({s}_prediction{{weeks_ago="{k}"}}'
                    f" - ignoring (weeks_ago) {per_week(s, k)}, 0.001)",
                    at(22, 9),
                    samples,
                )
                for s, samples in SIGNALS.items()
                for k in (1, 2, 3)
            ],
            # what the weeks agree on: on the echo with 2 weeks; on an incident both see; on the
            # echo with 3 weeks (the median); on the recurrence (the median, 2 of 3)
            *votes(at(15, 11), (["117.2", "12.3"], "12.3"), (["-596.8", "104.1"], "0")),
            *votes(at(15, 15), (["510.3", "536.3"], "510.3"), (["-652.9", "-644.7"], "-644.7")),
            *votes(
                at(22, 15),
                (["-463", "37.4", "63.4"], "37.4"),
                (["862.6", "212.1", "220.3"], "220.3"),
            ),
            *votes(
                at(22, 18),
                (["182.1", "577.2", "600.7"], "577.2"),
                (["-162.9", "-671.3", "-685"], "-671.3"),
            ),
        ],
    )


def new_deployment() -> Group:
    traffic = Traffic.seasonal(2, seed=3).scale(24 + 10, 48, events=0.3, clients=0.3)
    return Group(
        name="anomaly: quiet without a week of history",
        comment="""
-- no history ------------------------------------------------------------------------------
A deployment two days old loses 70% of its traffic: no prediction, no z-score, no alert.""",
        traffic=traffic,
        quiet=quiet_at(at(1, 11), at(1, 23)),
        exprs=[
            (f"{TRAFFIC_Z} or {CLIENTS_Z}", at(1, 23), []),
            (
                "job:crm_events_messages:flow_rate5m_prediction"
                " or job:crm_events_sse_clients:sum_prediction",
                at(1, 23),
                [],
            ),
        ],
    )


def idle() -> Group:
    """Also the value check of every rule, on numbers simple enough to follow by hand."""
    traffic = Traffic.constant(8 + 14 / 24, events=5, clients=8).scale(8 * 24 + 12, 10**6, 0, 0)
    m, c = "job:crm_events_messages:flow_rate5m", "job:crm_events_sse_clients:sum"
    both = [f'{{job="{EDGE_JOB}"}}', f'{{job="{INGEST_JOB}"}}']
    edge = [f'{{job="{EDGE_JOB}"}}']
    # the prediction of each week carries its weeks_ago; one week here
    both_1w = [lab.replace("}", ', weeks_ago="1"}') for lab in both]
    edge_1w = [lab.replace("}", ', weeks_ago="1"}') for lab in edge]

    def value(expr: str, eval_time: str, labels: list[str], v: str) -> Expr:
        return (f"round({expr}, 0.001)", eval_time, [(lab, v) for lab in labels])

    return Group(
        name="anomaly: an idle deployment below the floor stays quiet; the value of every rule",
        comment="""
-- idle, and the value of every rule ----------------------------------------------------------
The local stack's sample producer (5 events/s) and 8 clients, constant for 8.5 days, then
nothing from 8d12h. The z-scores go beyond -3, but last week's daily average is under the
floors (10 events/s, 20 clients): quiet.

Values (30-minute evaluations; a range [t-1d, t] holds 49 of them, both ends included):
* 8d: no prediction of the event rate yet (its first sample is at 30m, and the prediction
  needs one 8 days back); the clients' gauge has one at 0, so theirs starts now.
* 8d11h30m: all constant. The error has never varied: its stddev is 0 and the divisor is the
  floor (max(0, 0.1 * avg1d, 1) = 1); the z-score is 0, not NaN.
* 8d12h30m, events: the 5-minute rate shows the drop from 8d12h30m. avg1d = 48 * 5 / 49 =
  4.898 = the prediction (5 a week ago + 4.898 - 5), error -4.898. Errors since 8d30m: 24
  zeros and -4.898: stddev 0.960, under the floor 1, so z = -4.898.
* 8d12h30m, clients: the gauge shows the drop at 8d12h. avg1d = 47 * 8 / 49 = 7.673, error
  -7.673. Errors since 8d: 24 zeros, -7.837 (8d12h), -7.673: stddev 2.067, z = -3.713.
Without the floors the clients' alert would fire at 8d12h30m (pending since 8d12h).""",
        traffic=traffic,
        quiet=quiet_at(at(8, 12, 30), at(8, 13), at(8, 14)),
        exprs=[
            value(f"{m}_prediction", at(8), [], ""),
            value(f"{c}_prediction", at(8), edge_1w, "8"),
            value(m, at(8, 11, 30), both, "5"),
            value(f"{m}_avg1d", at(8, 11, 30), both, "5"),
            value(f"{m}_prediction", at(8, 11, 30), both_1w, "5"),
            value(f"{m}_error", at(8, 11, 30), both, "0"),
            value(f"{m}_error_stddev1w", at(8, 11, 30), both, "0"),
            value(f"{m}_zscore", at(8, 11, 30), both, "0"),
            value(f"{c}_zscore", at(8, 11, 30), edge, "0"),
            value(m, at(8, 12, 30), both, "0"),
            value(f"{m}_avg1d", at(8, 12, 30), both, "4.898"),
            value(f"{m}_prediction", at(8, 12, 30), both_1w, "4.898"),
            value(f"{m}_error", at(8, 12, 30), both, "-4.898"),
            value(f"{m}_error_stddev1w", at(8, 12, 30), both, "0.96"),
            value(f"{m}_zscore", at(8, 12, 30), both, "-4.898"),
            value(c, at(8, 12, 30), edge, "0"),
            value(f"{c}_avg1d", at(8, 12, 30), edge, "7.673"),
            value(f"{c}_prediction", at(8, 12, 30), edge_1w, "7.673"),
            value(f"{c}_error", at(8, 12, 30), edge, "-7.673"),
            value(f"{c}_error_stddev1w", at(8, 12, 30), edge, "2.067"),
            value(f"{c}_zscore", at(8, 12, 30), edge, "-3.713"),
            # what keeps both alerts quiet: last week's daily average, under the floors
            value(f"{m}_avg1d offset 1w", at(8, 12, 30), both, "5"),
            value(f"{c}_avg1d offset 1w", at(8, 12, 30), edge, "8"),
        ],
    )


def groups() -> list[Group]:
    return [three_weeks(), new_deployment(), idle()]


def main(argv: Sequence[str]) -> int:
    text = render(groups())
    if argv[1:] == ["--check"]:
        if OUT.read_text() != text:
            print(f"{OUT.name} is not the output of {Path(__file__).name}: run it", file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
