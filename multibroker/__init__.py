"""multibroker: one service that routes trading signals to futures accounts at several brokers.

The packages follow the data path: ``engine`` (load, validate, decide, schedule, reload), ``brokers`` (one
connector per broker behind one interface), ``multibroker`` (the command line and the service around them).
"""

__version__ = "0.1.0"
