"""A reproducible benchmark of the proxy against direct access and nginx (issue 7).

Usage::

    python -m proxy.bench                 # the full run: a few minutes on 2 cores
    python -m proxy.bench --smoke         # seconds, tiny counts, no speed asserted (CI)
    python -m proxy.bench --profile       # where the proxy's CPU goes per chunk (py-spy)
    python -m proxy.bench --only stream,embed --no-nginx --streams 50 --requests 500

Everything runs on 127.0.0.1, each part in a process of its own: simulated Ollama nodes
(``python -m proxy.sim``), the proxy (``python -m proxy --config <generated>``, on uvloop
when it is installed), nginx when its binary is installed (one worker, ``proxy_buffering off``,
HTTP/1.1 keep-alive upstreams, ``least_conn``; round robin too for the scheduling table), and
the load generator (``python -m proxy.bench.loadgen``), which never shares a process with what
it measures. Every process is stopped at the end, on errors and on Ctrl-C too.

It prints two tables. Relay, for direct access / proxy / nginx:

- CPU time of the front's processes per streamed chunk (utime + stime from /proc/PID/stat
  around the measured phase, divided by the NDJSON lines the clients received), 100 concurrent
  streams of 100 tokens at 5 ms per token on 2 nodes;
- time to first byte, p50 and p99, and what the front adds to direct access's: over those
  streams, and again at a light load (10 concurrent streams of 10 tokens, 1,500 measured),
  where a busy machine cannot hide the front's own cost. Both loads are measured in 3 rounds
  that take the fronts in turn, and the clients' first streams are spread over one stream's
  length, so that new requests do not all arrive in step. On Linux with 2 CPUs or more, the
  front being measured (the proxy, or nginx's master and worker) runs alone on the last CPU
  during these loads, the nodes and the load generator on the others (``cores.py``;
  ``--no-pin`` to share them);
- streams held at once (5,000) with the front's resident memory, idle and holding them;
- ``/api/embed`` requests per second, by the wall clock and per core of the front (requests
  divided by the front's CPU seconds, so that a front not saturated on a shared machine is
  still compared fairly);
- errors; and proxy ÷ nginx, measured in the same run, as absolute figures vary per machine.

Scheduling, for the proxy / nginx least_conn / nginx round robin, on a fast and a slow node that
each hold a different model and have memory for one (``--max-loaded 1``: any other model costs a
cold load and evicts the resident one once it is idle): latency mean and p99, and the nodes' cold
loads (from the simulator's ``/-/sim/stats``).

Issue 16's scheduling tables, for the same three fronts, each front in turn on the same nodes
(reset between them): unequal nodes (2, 6 and 25 ms per token), idle capacity (one warm node,
two that load the model in 0.3 s) and conversations (12 chats of 6 turns whose history a
slot's KV cache may hold; back to back, and with users' pauses between turns): latency mean
and p99, time to first token mean and p99, cold loads per node, errors, and for the chats the
share of prompt characters served from a slot's cache and the follow-up turns that changed
node (from the nodes' records). Each ends with the proxy's figures ÷ nginx least_conn's.
``--only unequal-open`` adds the unequal nodes under an open loop: Poisson arrivals at a fixed
rate whatever the fronts' latency, each stream timed from its arrival.

See docs/performance.md for figures and how to read them.
"""
