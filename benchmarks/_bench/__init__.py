"""What the benchmark scripts share: the sides, the workloads, measuring and reporting.

Not a script: hop.py, ring.py, scale.py, flow.py, write_cost.py and bench_app.py import it as
the package `_bench` (the scripts' own folder, benchmarks/, is first on sys.path when they run).

- sides: `baseline` (aio-pika + asyncpg by hand), `txflow_side`, `faststream_side`;
- the bench environment: `env` (scratch database, exchanges, queues), `events`;
- workloads: `preloaded`, `chains`, `latency` (hop.py); `ring` (ring.py); `workers`, `backlog`
  (scale.py), with the processes they start in `processes`;
- measuring: `cpu` (CPU time per process from /proc), `stats` (summaries, percentiles,
  ratios), `runs` (retries after a server restart, side order, the event loop);
- reporting: `results` (result records, JSON files), `hop_report`, `ring_report`,
  `scale_report`;
- the scripts' command lines: `cli` (server URLs, --json, the event loop, the JSON header);
- `defaults`: the URLs and the constants every part agrees on.
"""
