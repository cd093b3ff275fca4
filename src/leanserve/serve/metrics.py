"""Prometheus metrics of one server, in a registry of its own (several apps may share a process)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..energy.metrics import BoundedLabels, EnergyMetrics, Utilisation
from ..engine.sequence import CLASS_NAMES, RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self, engine_stats, ledger):
        """`engine_stats()` returns the engine's `stats()` dict; gauges read it at scrape time."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("leanserve_requests", "Finished HTTP API requests by status code",
                                ["status"], registry=r)
        by_class = ["priority"]  # service class: realtime, standard, batch
        self.ttft = Histogram("leanserve_time_to_first_token_seconds", "From arrival to first output token",
                              by_class, buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("leanserve_time_per_output_token_seconds",
                              "Mean time between output tokens after the first", buckets=PER_TOKEN_BUCKETS,
                              registry=r)
        self.e2e = Histogram("leanserve_e2e_request_latency_seconds", "From arrival to the last token",
                             by_class, buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("leanserve_queue_time_seconds", "From arrival to first scheduled",
                               by_class, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("leanserve_prompt_tokens", "Prompt tokens of finished sequences",
                                     registry=r)
        self.generation_tokens = Counter("leanserve_generation_tokens", "Output tokens of finished sequences",
                                         registry=r)
        gauges = {
            "leanserve_running_sequences": ("Sequences in the running batch", "num_running"),
            "leanserve_waiting_sequences": ("Sequences waiting to be scheduled", "num_waiting"),
            "leanserve_kv_cache_free_blocks": ("Free KV-cache blocks", "kv_blocks_free"),
        }
        for name, (doc, key) in gauges.items():
            Gauge(name, doc, registry=r).set_function(lambda key=key: engine_stats()[key])
        Gauge("leanserve_kv_cache_used_blocks", "KV-cache blocks in use", registry=r).set_function(
            lambda: engine_stats()["kv_blocks_total"] - engine_stats()["kv_blocks_free"])
        Gauge("leanserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r).set_function(
            lambda: 1 - engine_stats()["kv_blocks_free"] / engine_stats()["kv_blocks_total"])
        r.register(_EngineCounters(engine_stats))
        r.register(_ModelResidency(engine_stats))
        r.register(_StructuredOutputs(engine_stats))
        r.register(_Kernels())
        r.register(_GatewayAliases(engine_stats))
        self.energy = EnergyMetrics(ledger, Utilisation())
        r.register(self.energy)

    def count(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def observe(self, out: RequestOutput) -> None:
        """Records one sequence's final output."""
        m = out.metrics
        cls = CLASS_NAMES.get(out.priority, str(out.priority))
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.generation_tokens.inc(out.num_output_tokens)
        if m.first_scheduled is not None:
            self.queue.labels(cls).observe(m.first_scheduled - m.arrival)
        if m.first_token is not None:
            self.ttft.labels(cls).observe(m.first_token - m.arrival)
            if out.num_output_tokens > 1:
                self.tpot.observe((m.finished - m.first_token) / (out.num_output_tokens - 1))
        self.e2e.labels(cls).observe(m.finished - m.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def render_models(registries: dict[str, CollectorRegistry]) -> bytes:
    """Several models' registries as one exposition: every sample gets its model's `model`
    label, and a metric's samples stay together under one HELP/TYPE (as the format asks)."""
    merged: dict[str, Metric] = {}
    for model, registry in registries.items():
        for family in registry.collect():
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            into.samples += [s._replace(labels={**s.labels, "model": model}) for s in family.samples]

    class _Merged:
        def collect(self):
            return list(merged.values())

    out = CollectorRegistry(auto_describe=False)
    out.register(_Merged())
    return generate_latest(out)


class _EngineCounters:
    """Counters the engine keeps itself, read at scrape time (hit rate = hits / queries)."""

    COUNTERS = {
        "leanserve_prefix_cache_queries_tokens": ("Tokens of admitted sequences looked up in the prefix cache",
                                                  "prefix_cache_queried_tokens"),
        "leanserve_prefix_cache_hits_tokens": ("Of those, tokens whose KV came from the cache",
                                               "prefix_cache_hit_tokens"),
        "leanserve_preemptions": ("Sequences preempted for lack of KV blocks", "num_preemptions"),
    }

    def __init__(self, engine_stats):
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats()
        for name, (doc, key) in self.COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=stats[key])


class _Kernels:
    """leanserve_kernel_info: the product kernel chosen for each projection shape and row
    band at the model's setup (kernels/select.py: measured on this machine, or forced)."""

    def collect(self):
        from prometheus_client.core import InfoMetricFamily

        from ..kernels import select

        family = InfoMetricFamily("leanserve_kernel", "Product kernel chosen per projection shape and row band",
                                  labels=["weights", "shape", "rows"])
        for labels in select.info_labels():
            family.add_metric([labels["weights"], labels["shape"], labels["rows"]],
                              {"kernel": labels["kernel"], "modules": labels["modules"]})
        yield family


class _FromStats:
    """A collector over the engine's `stats()` dict, read at scrape time."""

    def __init__(self, engine_stats):
        self.engine_stats = engine_stats


class _ModelResidency(_FromStats):
    """Scale to zero: whether the weights are in memory, how often they were dropped, and
    how long each load took (the first one at startup too). Engines without these stats
    (tests' fakes) report nothing."""

    def collect(self):
        stats = self.engine_stats()
        if "model_loaded" not in stats:
            return
        yield GaugeMetricFamily("leanserve_model_loaded", "1 while the model weights are in memory, else 0",
                                value=float(stats["model_loaded"]))
        yield CounterMetricFamily("leanserve_model_unloads", "Times the model was unloaded after idling",
                                  value=stats["model_unloads"])
        loads = stats["model_load_seconds"]
        buckets = [(str(float(le)), sum(x <= le for x in loads)) for le in LOAD_BUCKETS]
        yield HistogramMetricFamily("leanserve_model_load_seconds", "Time to load the model weights",
                                    buckets=[*buckets, ("+Inf", len(loads))], sum_value=sum(loads))


class _StructuredOutputs(_FromStats):
    """Structured outputs: constrained tokens, those forced by the grammar (appended without
    sampling), and the time of each token mask and each grammar compile."""

    def collect(self):
        stats = self.engine_stats()
        if "structured_tokens" not in stats:
            return
        yield CounterMetricFamily("leanserve_structured_tokens", "Output tokens generated under a grammar",
                                  value=stats["structured_tokens"])
        yield CounterMetricFamily("leanserve_structured_forced_tokens", "Of those, tokens the grammar forced "
                                  "(appended without sampling)", value=stats["structured_forced_tokens"])
        for key, name, doc in (("structured_mask_seconds", "leanserve_structured_mask_seconds",
                                "Time to compute one sequence's token mask"),
                               ("structured_compile_seconds", "leanserve_structured_compile_seconds",
                                "Time to compile one grammar (cache misses)")):
            t = stats[key]
            buckets = [(str(float(le)), n) for le, n in zip(t.buckets, t.counts)]
            yield HistogramMetricFamily(name, doc, buckets=[*buckets, ("+Inf", t.count)], sum_value=t.sum)


class _GatewayAliases:
    """The names the Kubernetes Gateway API Inference Extension's model-server protocol reads
    (vLLM's), as aliases of leanserve's own: an endpoint picker then routes by queue depth, KV
    usage and resident adapters without knowing leanserve. `vllm:lora_requests_info` is a gauge
    whose value is the scrape time and whose labels carry the adapters, as vLLM exports it."""

    def __init__(self, engine_stats):
        self.stats = engine_stats

    def collect(self):
        stats = self.stats()
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Alias of leanserve_waiting_sequences",
                                value=stats["num_waiting"])
        yield GaugeMetricFamily("vllm:num_requests_running", "Alias of leanserve_running_sequences",
                                value=stats["num_running"])
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "Alias of leanserve_kv_cache_usage_ratio (1 = full)",
                                value=1 - stats["kv_blocks_free"] / stats["kv_blocks_total"])
        info = GaugeMetricFamily("vllm:lora_requests_info", "Adapters of running and waiting sequences (value: "
                                 "the scrape's unix time)",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([str(stats["max_loras"]), ",".join(stats["running_adapters"]),
                         ",".join(stats["waiting_adapters"])], time.time())
        yield info


class LoRAMetrics:
    """Adapters registered and resident (read at scrape time), loads, and requests per adapter."""

    def __init__(self, registry: CollectorRegistry, lora):
        r = registry
        Gauge("leanserve_lora_adapters_registered", "LoRA adapters that requests may name",
              registry=r).set_function(lambda: len(lora.adapters) if lora else 0)
        Gauge("leanserve_lora_adapters_resident", "LoRA adapters in compute slots (at most --max-loras)",
              registry=r).set_function(lambda: lora.num_resident if lora else 0)
        self.loads = Counter("leanserve_lora_loads", "LoRA adapter reads from disk (registration and reloads "
                             "after eviction)", registry=r)
        self.load_time = Histogram("leanserve_lora_load_seconds", "Time to read and check one LoRA adapter",
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
                                   registry=r)
        # adapter names come from clients (POST /v1/adapters): bounded like energy's labels
        self.requests = BoundedLabels(Counter("leanserve_lora_requests", "Generation requests by the adapter "
                                              "they name", ["adapter"], registry=r))

    def loaded(self, name: str, seconds: float) -> None:
        """Called by the adapter store from its loader threads (prometheus_client is thread-safe)."""
        self.loads.inc()
        self.load_time.observe(seconds)
