"""Multi-worker mode: one control plane process feeding N data-plane worker processes.

``messages`` and ``plan`` are the pure core (what is said between the processes, which worker
serves what, how counters from many processes add up); ``channel`` carries the messages and
file descriptors over a unix socket; ``supervisor`` is the control plane's side (spawn, feed,
replace, aggregate) and ``worker`` the worker process's composition root.
"""
