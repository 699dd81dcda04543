"""The orchestrator's Prometheus metrics: its backends by state, their memory against the budgets, and
how often they sleep and wake. Read from the registry and the fleet at scrape time, so every process of
one orchestrator reports the same states."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .manager import BackendManager
from .registry import STATES


class FleetCollector:
    """One scrape: gauges from the registry and the latest measurements, counters from this process's fleet."""

    def __init__(self, manager: BackendManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        manager, fleet = self.manager, self.manager.fleet
        records = manager.registry.backends()
        states = GaugeMetricFamily("lsorchestrator_backends", "Backends by state (sleeping: stopped until a request).",
                                   labels=["state"])
        for state in STATES:
            states.add_metric([state], sum(1 for r in records if r.state == state))
        yield states
        fleet.measure()
        memory = GaugeMetricFamily("lsorchestrator_memory_bytes", "PSS of everything the orchestrator started, "
                                   "at the larger of what each backend holds and what it will hold once loaded.")
        memory.add_metric([], fleet.memory_in_use())
        yield memory
        budget = GaugeMetricFamily("lsorchestrator_memory_budget_bytes", "MEMORY_BUDGET (0: none).")
        budget.add_metric([], manager.settings.memory_budget)
        yield budget
        events = CounterMetricFamily("lsorchestrator_fleet_events", "Backends woken, put to sleep (idle, or to make "
                                     "room within a budget), and starts refused for the budget.", labels=["event"])
        for event in ("wake", "sleep_idle", "sleep_budget", "sleep_headroom", "over_budget"):
            events.add_metric([event], fleet.events[event])
        yield events
        waiting = GaugeMetricFamily("lsorchestrator_wake_turns_waiting", "Requests in line to wake a sleeping "
                                    "backend (WAKE_TURNS at a time).")
        waiting.add_metric([], fleet.turns.waiting())
        yield waiting


class OrchestratorMetrics:
    """A registry of its own per app (no global state)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, manager: BackendManager) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(manager))

    def render(self) -> bytes:
        return generate_latest(self.registry)
