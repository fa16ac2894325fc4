"""What the dashboard shows, as one JSON-ready dict: built from what the service knows at one instant.

Two halves, kept apart on purpose. ``account_inputs`` and ``dashboard`` are pure: they take the rules, the day's
positions book, broker snapshots and journal rows and only add up, so they are tested with hand-made fixtures.
``collect`` is the thin adapter that reads those inputs from a running service (runtime, journal, rules watcher).

Daily P&L here is the risk monitor's: the trading day's book (``RiskMonitor.book``), in which positions carried
over from yesterday start at the day-start mark (as futures settle daily). The dashboard therefore shows the
same daily figure the risk rules act on; a trader never sees "fine" on screen while the monitor halts.

Free margin is the engine's view: the broker's free margin *minus the margin reserved by entries still in
flight*, so an order the slow broker has not confirmed yet already counts against the account.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping, Sequence

from engine.model import RuleSet
from engine.sessions import trading_day_start
from view.aggregate import ZERO, AccountInput, PortfolioView, PositionView, portfolio_view, to_jsonable

PRICE_QUANTUM = Decimal("0.0001")
CENT = Decimal("0.01")
MAX_SIGNALS = 20
MAX_RECONCILIATIONS = 20
MAX_ATTENTION = 50
ATTENTION_STATUSES = ("rejected", "missed", "unknown")
"""Order statuses a trader must act on or at least know about: the order did not do what the decision wanted."""
ALERT_KINDS = ("flatten_failed", "halt", "adopt", "clear")
"""Risk events of the day a trader should see as they happen: a flatten that could not close, a halt, positions
adopted from a broker after a mismatch, a halt cleared (day-start marks and re-arms are bookkeeping)."""


def _utc(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def account_inputs(rules: RuleSet, day_book: Any, *, marks: Callable[[str], Decimal | None],
                   point_value: Callable[[str], Decimal], snapshots: Mapping[str, Any],
                   free_margin: Mapping[str, Decimal], connected: Mapping[str, bool],
                   halted: Mapping[str, str | None]) -> tuple[list[AccountInput], dict[str, Decimal]]:
    """Per account: cash and margin from its broker, the day's realized P&L and open positions from the day book.

    Returns the inputs and the day's realized P&L (net of commissions) per strategy, which only the book can split
    (one account may follow several strategies).
    """
    by_account: dict[str, list[tuple[str, str, Any]]] = defaultdict(list)
    by_strategy: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for (account, strategy, contract), book in sorted(day_book.books.items()):
        by_account[account].append((strategy, contract, book))
        by_strategy[strategy] += book.realized - book.commissions
    inputs = []
    for name in sorted(rules.accounts):
        realized = commissions = ZERO
        positions = []
        for strategy, contract, book in by_account.get(name, ()):
            realized += book.realized - book.commissions
            commissions += book.commissions
            if book.quantity:
                mark = marks(contract)
                unrealized = None if mark is None else book.unrealized(mark, point_value(contract)).quantize(CENT)
                positions.append(PositionView(name, strategy, contract, book.quantity,
                                              book.avg_price.quantize(PRICE_QUANTUM), mark, unrealized))
        snap = snapshots.get(name)
        inputs.append(AccountInput(
            name=name,
            cash=ZERO if snap is None else snap.cash_balance,
            margin_used=ZERO if snap is None else snap.margin_used,
            free_margin=free_margin.get(name, ZERO if snap is None else snap.free_margin),
            realized=realized.quantize(CENT), commissions=commissions.quantize(CENT), positions=tuple(positions),
            connected=connected.get(name, False), halted=halted.get(name)))
    return inputs, {s: v.quantize(CENT) for s, v in by_strategy.items()}


def equity_curves(marks: Iterable[Mapping[str, Any]], live: Mapping[str, Decimal] | None = None,
                  now: datetime | None = None) -> dict[str, list[list[str]]]:
    """Equity per account and for the portfolio, one point per daily 17:00 ET mark, then the live value now.

    The portfolio point of a day is the sum of that day's account marks (all taken at the same instant).
    """
    curves: dict[str, list[list[str]]] = defaultdict(list)
    per_day: dict[str, tuple[str, Decimal]] = {}
    for row in marks:
        if row.get("equity") is None:
            continue
        equity = Decimal(str(row["equity"]))
        curves[row["account"]].append([row["trading_day"], str(equity)])
        _, total = per_day.get(row["trading_day"], ("", ZERO))
        per_day[row["trading_day"]] = (row["trading_day"], total + equity)
    curves_out = dict(curves)
    portfolio = [[day, str(total)] for day, total in sorted(per_day.values())]
    if live:
        label = "now" if now is None else _utc(now)
        for name, value in live.items():
            curves_out.setdefault(name, []).append([label, str(value)])
        portfolio.append([label, str(sum(live.values(), ZERO))])
    if portfolio:
        curves_out["portfolio"] = portfolio
    return dict(sorted(curves_out.items()))


def signal_rows(signals: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Latest signals with their decision records: why each account got, or did not get, an order."""
    out = []
    for row in signals:
        signal = row.get("signal") or {}
        out.append({"signal_id": row.get("id"), "received_at": row.get("received_at"), "status": row.get("status"),
                    "reason": row.get("reason"), "strategy": row.get("strategy") or signal.get("strategy"),
                    "action": signal.get("action"), "ticker": signal.get("ticker"),
                    "decision": row.get("decision")})
    return out


def reconciliation_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        mismatches = row.get("mismatches") or []
        detail = "; ".join(f"{m.get('contract')}: ours {m.get('ledger')}, broker {m.get('broker')}"
                           for m in mismatches if isinstance(m, Mapping)) or row.get("error")
        out.append({"time": row.get("at"), "broker": row.get("broker"), "account": row.get("account"),
                    "ok": bool(row.get("ok")), "detail": detail, "policy": row.get("policy")})
    return out


def attention_rows(orders: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The trading day's orders that did not reach their broker as decided, each with what it means for the account.

    Every one is in the journal already, but nobody reads the journal during a session: a rejected exit leaves a
    position open, a missed mirror entry leaves an account behind its strategy, an unknown outcome waits for its
    broker. The page shows them on top so that they are seen while there is still time to act."""
    out = []
    for o in orders:
        status, exit_ = o.get("status"), o.get("intent") == "exit"
        if status == "unknown":
            meaning = "outcome unknown: looked up at the broker by client order id before anything is resent"
        elif exit_:
            meaning = "exit not done: the position may still be open"
        elif status == "missed":
            meaning = "entry missed: the account is behind its strategy"
        else:
            meaning = "entry refused by the broker: the account is behind its strategy"
        detail = o.get("detail")
        out.append({"time": o.get("updated_at"), "signal_id": o.get("signal_id"),
                    "client_order_id": o.get("client_order_id"), "account": o.get("account"),
                    "broker": o.get("broker"), "contract": o.get("contract"), "side": o.get("side"),
                    "quantity": o.get("quantity"), "intent": o.get("intent"), "status": status,
                    "detail": None if detail is None else detail if isinstance(detail, str) else str(detail),
                    "meaning": meaning, "exit": exit_})
    return out


def alert_rows(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The day's alert-worthy risk events (``ALERT_KINDS``), newest first, as the page lists them."""
    return [{"time": e.get("at"), "kind": e.get("kind"), "name": e.get("name"), "reason": e.get("reason"),
             "source": e.get("source")} for e in events if e.get("kind") in ALERT_KINDS][:MAX_ATTENTION]


def dashboard(rules: RuleSet, inputs: Sequence[AccountInput], *, realized_by_strategy: Mapping[str, Decimal],
              brokers: Sequence[Mapping[str, Any]], halts: Sequence[Mapping[str, Any]],
              signals: Iterable[Mapping[str, Any]], reconciliations: Iterable[Mapping[str, Any]],
              marks: Iterable[Mapping[str, Any]], live_equity: Mapping[str, Decimal],
              rules_info: Mapping[str, Any], now: datetime,
              attention: Iterable[Mapping[str, Any]] = (),
              alerts: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The whole page's data in one dict (Decimals as strings)."""
    view: PortfolioView = portfolio_view(rules, inputs, realized_by_strategy)
    return {
        "time": _utc(now),
        "portfolio": to_jsonable(view),
        "brokers": [dict(b) for b in brokers],
        "halts": [dict(h) for h in halts],
        "equity": equity_curves(marks, live_equity, now),
        "signals": signal_rows(signals),
        "reconciliations": reconciliation_rows(reconciliations),
        "attention": attention_rows(attention),
        "alerts": alert_rows(alerts),
        "rules": dict(rules_info),
    }


def live_equity(rules: RuleSet, ledger: Any, marks: Callable[[str], Decimal | None],
                point_value: Callable[[str], Decimal]) -> dict[str, Decimal]:
    """Account capital (from the rules) plus everything our ledger booked: realized - commissions + open P&L.

    Broker-independent on purpose: brokers disagree on when cash moves (daily settlement vs on close), our
    ledger does not, so equity curves across brokers compare like with like.
    """
    out = {}
    for name, account in sorted(rules.accounts.items()):
        total = account.capital
        for (a, _s, contract), book in ledger.books.items():
            if a == name:
                total += book.net(marks(contract), point_value(contract))
        out[name] = total.quantize(CENT)
    return out


# -- the adapter over a running service -----------------------------------------------------------------------

def collect(runtime: Any, journal: Any, watcher: Any, now: datetime | None = None) -> dict[str, Any]:
    """Read the inputs from the running service and build the dashboard dict (called a few times a second)."""
    now = now or datetime.now(timezone.utc)
    rules: RuleSet = runtime.ruleset
    risk = runtime.risk
    state = runtime.engine_state(now)
    inputs, realized_by_strategy = account_inputs(
        rules, risk.book, marks=risk.marks, point_value=risk.point_value, snapshots=runtime.account_snapshots(),
        free_margin={n: a.free_margin for n, a in state.accounts.items()},
        connected={n: a.connected for n, a in state.accounts.items()},
        halted={n: a.halted for n, a in state.accounts.items()})
    status = runtime.status()
    history = list(watcher.history)
    last = history[-1].as_dict() if history else None
    applied = next((r for r in reversed(history) if r.outcome == "applied"), None)
    rules_info = {"generation": watcher.generation, "content_hash": None if applied is None else applied.content_hash,
                  "last_reload": last}
    return dashboard(
        rules, inputs, realized_by_strategy=realized_by_strategy, brokers=status.get("brokers", []),
        halts=status.get("halts", []), signals=journal.recent_signals(MAX_SIGNALS),
        reconciliations=journal.reconciliations(MAX_RECONCILIATIONS), marks=journal.daily_marks(),
        live_equity=live_equity(rules, runtime.ledger, risk.marks, risk.point_value), rules_info=rules_info,
        now=now, attention=journal.orders(status=ATTENTION_STATUSES, updated_since=trading_day_start(now),
                                          limit=MAX_ATTENTION),
        alerts=journal.risk_events_since(trading_day_start(now), kinds=ALERT_KINDS))


__all__ = ["account_inputs", "alert_rows", "attention_rows", "collect", "dashboard", "equity_curves", "live_equity", "reconciliation_rows",
           "signal_rows"]
