"""Step 1 of the collaboration protocol: pick the specialists whose description matches the query.

Paper §IV-A step (1): "identify the most relevant device models by matching the incoming query to
descriptions on each model's domain-specific expertise". Conventions follow semantic-router
(ANCHORS §4): every route (specialist) has example *utterances* — its description plus, when derived
from training data, a few snippets of it — embedded once with all-MiniLM-L6-v2; a query is embedded
the same way and each route is scored by the **mean of its top-m cosine similarities** (m = 5 by
default; semantic-router takes the top-5 utterances and aggregates per route by mean). Routes scoring
at least ``threshold`` (0.5 is semantic-router's default for this encoder) are selected, best first,
at most ``top_k`` of them. No route above the threshold means *no match*: the general member answers
and the response says so.

Everything below except :class:`Router` (which holds the encoder) is pure tensor math.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aiflow_fl.errors import AiflowError


@dataclass
class Route:
    """One specialist as the router sees it."""

    name: str
    description: str
    utterances: list[str] = field(default_factory=list)  # extra examples (snippets of its training data)

    def texts(self) -> list[str]:
        return [self.description, *[u for u in self.utterances if u.strip()]]


@dataclass
class RoutingDecision:
    """Scores of every route, the selected ones (best first) and their fusion weights."""

    scores: dict[str, float]
    selected: list[str]
    weights: dict[str, float]
    threshold: float
    top_k: int

    @property
    def matched(self) -> bool:
        return bool(self.selected)

    def explain(self) -> str:
        """One line for the response: who answers and why."""
        if self.matched:
            picked = ", ".join(f"{n} ({self.scores[n]:.2f})" for n in self.selected)
            return f"routed to {picked}"
        best = max(self.scores.items(), key=lambda kv: kv[1]) if self.scores else ("none", float("nan"))
        return (f"no specialist matched (best {best[0]} at {best[1]:.2f} < threshold {self.threshold:.2f}); "
                "answered by the general member")


def route_scores(query: torch.Tensor, utterances: torch.Tensor, owners: list[int], num_routes: int, top_m: int = 5) -> torch.Tensor:
    """Per-route score: mean of the route's ``top_m`` highest cosine similarities to the query.

    ``query`` (d,) and ``utterances`` (U, d) are unit-norm; ``owners[u]`` is the route of utterance u.
    A route with no utterance scores -inf."""
    sims = utterances @ query
    owner = torch.as_tensor(owners, dtype=torch.long)
    scores = torch.full((num_routes,), float("-inf"))
    for r in range(num_routes):
        mine = sims[owner == r]
        if mine.numel():
            scores[r] = mine.topk(min(top_m, mine.numel())).values.mean()
    return scores


def select_routes(scores: dict[str, float], top_k: int, threshold: float) -> list[str]:
    """Routes with score ≥ ``threshold``, best first, at most ``top_k`` (ties broken by name)."""
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [name for name, score in ranked if score >= threshold][:top_k]


def fusion_weights(scores: list[float], temperature: float) -> list[float]:
    """Weights of the selected specialists for token-level fusion: softmax(score / temperature).

    temperature → 0 gives all weight to the best route; large temperatures give uniform weights."""
    if not scores:
        return []
    if temperature <= 0:
        best = max(range(len(scores)), key=lambda i: scores[i])
        return [1.0 if i == best else 0.0 for i in range(len(scores))]
    logits = torch.tensor(scores, dtype=torch.float64) / temperature
    return torch.softmax(logits, 0).tolist()


class Router:
    """Routes embedded once; :meth:`route` embeds a query and decides (see the module docstring)."""

    def __init__(self, routes: list[Route], encoder, top_k: int = 2, threshold: float = 0.5,
                 temperature: float = 0.05, top_m: int = 5) -> None:
        check_router_settings(top_k, threshold, temperature, top_m)
        if not routes:
            raise AiflowError("The router has no specialists to route to (no route was given).")
        names = [r.name for r in routes]
        if len(set(names)) != len(names):
            raise AiflowError(f"Specialist names must be unique; got {names}.")
        self.routes = routes
        self.encoder = encoder
        self.top_k, self.threshold, self.temperature, self.top_m = top_k, threshold, temperature, top_m
        texts, owners = [], []
        for index, route in enumerate(routes):
            for text in route.texts():
                texts.append(text)
                owners.append(index)
        self.owners = owners
        self.utterances = encoder.encode(texts)

    def scores(self, query: str) -> dict[str, float]:
        vector = self.encoder.encode([query])[0]
        values = route_scores(vector, self.utterances, self.owners, len(self.routes), self.top_m)
        return {route.name: float(v) for route, v in zip(self.routes, values)}

    def route(self, query: str, top_k: int | None = None) -> RoutingDecision:
        scores = self.scores(query)
        k = self.top_k if top_k is None else top_k
        selected = select_routes(scores, k, self.threshold)
        weights = fusion_weights([scores[n] for n in selected], self.temperature)
        return RoutingDecision(scores, selected, dict(zip(selected, weights)), self.threshold, k)


def check_router_settings(top_k: int, threshold: float, temperature: float, top_m: int = 5) -> None:
    if top_k < 1:
        raise AiflowError(f"collab.top_k is {top_k}; at least one specialist must be selectable (>= 1).")
    if not -1.0 <= threshold <= 1.0:
        raise AiflowError(f"collab.threshold is {threshold}; a cosine-similarity threshold lies in [-1, 1].")
    if temperature < 0:
        raise AiflowError(f"collab.temperature is {temperature}; it must be >= 0 (0: all weight on the best route).")
    if top_m < 1:
        raise AiflowError(f"collab.top_m is {top_m}; a route is scored by its top m >= 1 utterances.")
