"""
mqttsvc's benchmark suite: speed, scale and memory, each measured beside a
baseline in the same run.

C{python -m bench [SCENARIO ...]} (or C{make bench}) runs the scenarios
against a private Mosquitto and a fresh PostgreSQL database, repeats each
measurement, and writes C{BENCHMARKS.md}.  Every measurement runs in a
child process of its own (C{python -m bench.child}), so that each gets a
fresh reactor and its memory and CPU figures are its own; the cluster
scenario (L{bench.cluster}) runs real C{twistd mqttsvc} processes instead.
"""
