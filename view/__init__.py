"""The view: one picture of every account (aggregation, performance, dashboard, metrics)."""
