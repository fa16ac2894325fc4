"""The service: HTTP in, journal, dispatch to brokers, reconciliation, risk and schedule around the engine."""
