"""The dashboard: the model pool, the queue, tokens per minute and latency against targets.

Fed by ``metrics`` when the daemon has it; an older daemon's dashboard says
"metrics unavailable" and derives tokens per minute from the ledger (``usage``)
instead. The status call's own round trip is measured here too: a latency a
person can watch even without ``metrics``.
"""

from __future__ import annotations

import time
from collections import deque

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Sparkline, Static

from tale_client.tui.model import DaemonStatus, Metrics, ModelInfo, Usage
from tale_client.tui.screens._base import TaleScreen

__all__ = ["DashboardScreen", "LedgerRates"]

REFRESH_SECONDS = 1.0
HISTORY = 60  # samples kept for the live sparklines (a minute at one a second)
STATUS_TARGET_MS = 5.0  # the spec's status p99 target


class LedgerRates:
    """Tokens per minute per model, from successive ledger totals (no ``metrics`` tool)."""

    def __init__(self, window_seconds: float = 60.0) -> None:
        self.window = window_seconds
        self._samples: deque[tuple[float, dict[str, int]]] = deque()
        self.per_tick: deque[float] = deque(maxlen=HISTORY)

    def add(self, usage: Usage, at: float) -> None:
        """Record the ledger's totals at time ``at``."""
        totals = {r.model: r.tokens for r in usage.by_model}
        if self._samples:
            previous = self._samples[-1][1]
            self.per_tick.append(float(max(0, sum(totals.values()) - sum(previous.values()))))
        self._samples.append((at, totals))
        while len(self._samples) > 2 and at - self._samples[0][0] > self.window:
            self._samples.popleft()

    def per_minute(self) -> dict[str, float]:
        """Each model's tokens per minute over the window (empty until two samples)."""
        if len(self._samples) < 2:
            return {}
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        span = max(t1 - t0, 1e-6)
        return {m: max(0, n - first.get(m, 0)) * 60.0 / span for m, n in last.items()}


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


class DashboardScreen(TaleScreen):
    """Live numbers a person reads at a glance."""

    def __init__(self, live: bool = True) -> None:
        super().__init__(id="dashboard")
        self.live = live
        self.queue_history: deque[float] = deque(maxlen=HISTORY)
        self.rtt_history: deque[float] = deque(maxlen=HISTORY)
        self.rates = LedgerRates()
        self._refreshing = False
        self._has_metrics: bool | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="dash-summary")
        with Horizontal(id="dash-top"):
            with Vertical(id="pool-box", classes="box"):
                yield Static("[b]Model pool[/b]", classes="section-title")
                yield DataTable(id="pool", cursor_type="none", zebra_stripes=True)
            with Vertical(id="queue-box", classes="box"):
                yield Static("[b]Queue[/b]", classes="section-title")
                yield Static(id="queue-counts")
                yield Sparkline([], id="queue-spark")
                yield Static("[dim]tasks to do (queued + running + waiting), last minute[/dim]")
        with Horizontal(id="dash-bottom"):
            with Vertical(id="tokens-box", classes="box"):
                yield Static("[b]Tokens per minute[/b]", classes="section-title")
                yield Sparkline([], id="tokens-spark")
                yield Static(id="tokens-caption")
                yield DataTable(id="tokens", cursor_type="none")
            with Vertical(id="latency-box", classes="box"):
                yield Static("[b]Latency against targets[/b]", classes="section-title")
                yield DataTable(id="latency", cursor_type="none")
                yield Sparkline([], id="rtt-spark")
                yield Static(id="rtt-caption")
                yield Static(id="violations")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#pool", DataTable).add_columns(
            "role", "model", "pinned", "loaded", "health", "memory", "calls", "tokens"
        )
        self.query_one("#tokens", DataTable).add_columns("model", "role", "tok/min", "window")
        self.query_one("#latency", DataTable).add_columns(
            "what", "p50", "p95", "p99", "target", "ok", "n"
        )
        self.show_metrics(None, "waiting for the daemon")
        if self.live:
            self.set_interval(REFRESH_SECONDS, self._tick)
            self.tale.connection_signal.subscribe(self, self._on_connection)

    def _on_connection(self, _api: object) -> None:
        # A daemon that came back may be a newer one, with metrics.
        self._has_metrics = None
        self._tick()

    def on_screen_resume(self) -> None:
        """Back on the dashboard: refresh at once."""
        if self.live:
            self._tick()

    # -- data -----------------------------------------------------------------

    def _tick(self) -> None:
        if self._refreshing or self.tale.api is None or not self.is_current:
            return
        self._refreshing = True
        self.run_worker(self.refresh_numbers(), group="dashboard-refresh")

    async def refresh_numbers(self) -> None:
        """Fetch status, pool and metrics (or the ledger) and show them."""
        try:
            started = time.perf_counter()
            status = await self.call(lambda api: api.daemon_status(), "daemon status")
            rtt_ms = (time.perf_counter() - started) * 1000
            if status is None:
                return
            self.show_status(status, rtt_ms)
            models = await self.call(lambda api: api.models(), "models")
            if models is not None:
                self.show_models(models)
            metrics = None
            if self._has_metrics is not False:
                metrics = await self.call(lambda api: api.metrics(), "metrics")
                self._has_metrics = metrics is not None
            if metrics is not None:
                self.show_metrics(metrics)
                return
            usage = await self.call(lambda api: api.usage(), "usage")
            if usage is not None:
                self.rates.add(usage, time.monotonic())
            self.show_metrics(None, "this daemon has no metrics tool")
        finally:
            self._refreshing = False

    def show_status(self, status: DaemonStatus, rtt_ms: float | None = None) -> None:
        """The summary line and the queue."""
        up = status.uptime_seconds
        uptime = f"{up / 3600:.1f} h" if up >= 3600 else f"{up / 60:.0f} min"
        self.query_one("#dash-summary", Static).update(
            f"taled {escape(status.version)} · pid {status.pid} · up {uptime} · "
            f"workers {status.workers_busy}/{status.workers_limit} busy"
        )
        t = status.tasks
        todo = t.get("queued", 0) + t.get("running", 0) + t.get("waiting", 0)
        self.query_one("#queue-counts", Static).update(
            f"queued [b]{t.get('queued', 0)}[/b]  running [b]{t.get('running', 0)}"
            f"/{status.workers_limit}[/b]  waiting [b]{t.get('waiting', 0)}[/b]  "
            f"paused [b]{t.get('paused', 0)}[/b]\n"
            f"completed {t.get('completed', 0)}  failed {t.get('failed', 0)}  "
            f"cancelled {t.get('cancelled', 0)}"
        )
        self.queue_history.append(float(todo))
        self.query_one("#queue-spark", Sparkline).data = list(self.queue_history)
        if rtt_ms is not None:
            self.rtt_history.append(rtt_ms)
            self.query_one("#rtt-spark", Sparkline).data = list(self.rtt_history)
            worst = max(self.rtt_history)
            self.query_one("#rtt-caption", Static).update(
                f"[dim]status round trip from here: now {rtt_ms:.1f} ms, worst {worst:.1f} ms "
                f"(daemon target p99 ≤ {STATUS_TARGET_MS:g} ms)[/dim]"
            )

    def show_models(self, models: list[ModelInfo]) -> None:
        """The pool table."""
        table: DataTable[str] = self.query_one("#pool", DataTable)
        table.clear()
        for m in models:
            health = m.health if m.serving is None else f"{m.health} → {m.serving}"
            table.add_row(
                m.role,
                m.spec,
                "yes" if m.pinned else "no",
                "yes" if m.loaded else "no",
                health,
                m.memory(),
                str(m.calls),
                str(m.prompt_tokens + m.completion_tokens),
            )

    def show_metrics(self, metrics: Metrics | None, unavailable: str = "") -> None:
        """Tokens per minute and latencies; without metrics, the ledger's rates."""
        tokens: DataTable[str] = self.query_one("#tokens", DataTable)
        latency: DataTable[str] = self.query_one("#latency", DataTable)
        tokens.clear()
        latency.clear()
        spark = self.query_one("#tokens-spark", Sparkline)
        caption = self.query_one("#tokens-caption", Static)
        violations = self.query_one("#violations", Static)
        if metrics is None:
            spark.data = list(self.rates.per_tick)
            caption.update(
                f"[dim]from the ledger (usage), per second; metrics unavailable: "
                f"{escape(unavailable)}[/dim]"
            )
            for model, rate in sorted(self.rates.per_minute().items()):
                tokens.add_row(model, "-", f"{rate:.0f}", "-")
            latency.add_row("metrics unavailable", "-", "-", "-", "-", "-", "-")
            violations.update("")
            return
        spark.data = [float(n) for n in metrics.minutes()]
        caption.update(f"[dim]all models, per minute, last {metrics.window_minutes} min[/dim]")
        for model, role, last, total in metrics.by_model():
            tokens.add_row(model, role, str(last), str(total))
        for stat in metrics.latency:
            ok = "-" if stat.ok is None else ("✓" if stat.ok else "✗")
            target = "-" if stat.target is None else f"{stat.stat} ≤ {stat.target:g} {stat.unit}"
            latency.add_row(
                stat.name,
                _num(stat.p50),
                _num(stat.p95),
                _num(stat.p99),
                target,
                ok,
                str(stat.samples),
            )
        if metrics.violations:
            lines = [
                f"[b]✗[/b] {escape(v.name)} {_num(v.value)} > {_num(v.target)} "
                f"[dim]{escape(v.context)}[/dim]"
                for v in metrics.violations[-3:]
            ]
            violations.update("Recent misses:\n" + "\n".join(lines))
        else:
            violations.update("[dim]no target missed in the window[/dim]")
