"""Private ports for a local stack that tests start with ``crm-events-stack`` (as ``make up``
does), so that it never meets the stack of the default ports a developer may be running."""

from __future__ import annotations

import contextlib
import socket

#: The stack's single-port settings (devtools/stack.py); edges take CRM_EVENTS_EDGE_PORTS.
PORT_VARIABLES = (
    "CRM_EVENTS_KAFKA_PORT",
    "CRM_EVENTS_KAFKA_CONTROLLER_PORT",
    "CRM_EVENTS_REDIS_PORT",
    "CRM_EVENTS_INGEST_PORT",
    "CRM_EVENTS_LB_PORT",
    "CRM_EVENTS_LB_TLS_PORT",
    "CRM_EVENTS_LB_MTLS_PORT",
    "CRM_EVENTS_PROMETHEUS_PORT",
    "CRM_EVENTS_ALERTMANAGER_PORT",
)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now (all held until all are chosen)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def private_stack_ports(edges: int, spare: int = 0) -> tuple[dict[str, str], list[int]]:
    """The CRM_EVENTS_* port settings of a stack with ``edges`` edges, and the edges' ports
    followed by ``spare`` more (for an edge a test adds later), all distinct."""
    ports = free_ports(len(PORT_VARIABLES) + edges + spare)
    env = dict(zip(PORT_VARIABLES, map(str, ports), strict=False))
    edge_ports = ports[len(PORT_VARIABLES) :]
    env["CRM_EVENTS_EDGE_PORTS"] = ",".join(map(str, edge_ports[:edges]))
    return env, edge_ports
