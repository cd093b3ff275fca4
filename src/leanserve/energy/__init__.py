"""Energy, carbon and cost of every request.

meters.py   cumulative joules: RAPL, NVML, or an estimate from CPU time and memory
ledger.py   per-step joules split over the step's sequences by FLOPs; idle energy apart
carbon.py   grid intensity (number, region, hourly series), PUE, embodied carbon, prices
config.py   the CLI options and the ledger they make
metrics.py  the Prometheus side: totals, per model/adapter/user, utilisation gauges
report.py   the per-request usage log and `leanserve report`
"""
