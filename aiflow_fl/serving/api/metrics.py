"""Prometheus metrics of one server (``GET /metrics``), named after vLLM's (``vllm:`` -> ``aiflow:``).

Speculative decoding counters follow vLLM's: a *draft* is one verification of a drafted block, so
mean acceptance length = 1 + num_accepted_tokens / num_drafts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("aiflow:request_success", "Finished requests", ["model", "finish_reason"], registry=r)
        self.errors = Counter("aiflow:request_errors", "Requests answered with an error", ["status"], registry=r)
        self.running = Gauge("aiflow:num_requests_running", "Requests generating now", ["model"], registry=r)
        self.latency = Histogram("aiflow:e2e_request_latency_seconds", "Request latency", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("aiflow:time_to_first_token_seconds", "Time to the first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("aiflow:prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.generation_tokens = Counter("aiflow:generation_tokens", "Generated tokens", ["model"], registry=r)
        self.batch_size = Histogram("aiflow:decode_batch_size", "Sequences per batched decode step", ["model"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.num_drafts = Counter("aiflow:spec_decode_num_drafts", "Verifications of drafted blocks", ["model", "link"], registry=r)
        self.num_draft_tokens = Counter("aiflow:spec_decode_num_draft_tokens", "Drafted tokens checked", ["model", "link"], registry=r)
        self.num_accepted_tokens = Counter("aiflow:spec_decode_num_accepted_tokens", "Drafted tokens accepted",
                                           ["model", "link"], registry=r)
        self.verifier_lost = Counter("aiflow:verifier_lost", "Requests whose verifier was lost", ["model", "policy"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
