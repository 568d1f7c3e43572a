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

**Hybrid (dense + lexical) scoring**, optional (``lexical_weight`` = alpha > 0; semantic-router's
HybridRouter mixes a dense and a sparse encoder the same way): the route's score becomes
``(1 - alpha) * dense + alpha * lexical``, where ``lexical`` is the cosine between the query's TF-IDF
vector and the route's TF-IDF centroid (the normalised mean of its utterances' TF-IDF vectors;
sublinear tf, smoothed idf over all routes' utterances, as scikit-learn's ``TfidfVectorizer`` with
``sublinear_tf=True``). Tokens are lower-cased words plus runs of punctuation, so code (``):``,
``==``, ``>>>``) and prose separate lexically where MiniLM, trained on sentences, blurs them.
With alpha = 0 the router is the purely dense one above.

Everything below except :class:`Router` (which holds the encoder) is pure math, without I/O:
route embeddings may be computed elsewhere (and cached) and handed in.
"""

from __future__ import annotations

import math
import re
from collections import Counter
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
    return route_scores_many(query[None], utterances, owners, num_routes, top_m)[0]


def route_scores_many(queries: torch.Tensor, utterances: torch.Tensor, owners: list[int], num_routes: int,
                      top_m: int = 5) -> torch.Tensor:
    """:func:`route_scores` for a batch of queries (Q, d) -> (Q, num_routes)."""
    sims = queries @ utterances.T  # (Q, U)
    owner = torch.as_tensor(owners, dtype=torch.long)
    scores = torch.full((queries.shape[0], num_routes), float("-inf"))
    for r in range(num_routes):
        mine = sims[:, owner == r]
        if mine.shape[1]:
            scores[:, r] = mine.topk(min(top_m, mine.shape[1]), dim=1).values.mean(1)
    return scores


# ---------------------------------------------------------------------------- lexical (TF-IDF) scores
_TOKEN = re.compile(r"[a-z_][a-z0-9_]*|[0-9]+|[^\sa-z0-9_]+")


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased words (identifiers), numbers and runs of punctuation (``>>>``, ``):``, ``==``)."""
    return _TOKEN.findall(text.lower())


class TfidfIndex:
    """TF-IDF centroids of the routes (module docstring); :meth:`scores` gives query-route cosines."""

    def __init__(self, texts: list[str], owners: list[int], num_routes: int) -> None:
        if len(texts) != len(owners):
            raise ValueError(f"{len(texts)} texts but {len(owners)} owners")
        counts = [Counter(lexical_tokens(t)) for t in texts]
        df: Counter[str] = Counter()
        for c in counts:
            df.update(c.keys())
        self.vocab = {w: i for i, w in enumerate(sorted(df))}
        n = len(texts)
        # smoothed idf: log((1 + n) / (1 + df)) + 1
        self.idf = [math.log((1 + n) / (1 + df[w])) + 1.0 for w in sorted(df)]
        self.centroids = torch.zeros(num_routes, len(self.vocab))
        for c, r in zip(counts, owners):
            self.centroids[r] += self._vector(c)
        self.centroids = torch.nn.functional.normalize(self.centroids, p=2, dim=1)

    def _vector(self, counts: Counter) -> torch.Tensor:
        index, value = [], []
        for w, k in counts.items():
            i = self.vocab.get(w)
            if i is not None:
                index.append(i)
                value.append((1.0 + math.log(k)) * self.idf[i])
        v = torch.zeros(len(self.vocab))
        v[torch.tensor(index, dtype=torch.long)] = torch.tensor(value, dtype=torch.float32)
        return torch.nn.functional.normalize(v, p=2, dim=0)

    def vectors(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), V) unit-norm TF-IDF rows (words unseen in the routes are ignored)."""
        if not texts:
            return torch.zeros(0, len(self.vocab))
        return torch.stack([self._vector(Counter(lexical_tokens(t))) for t in texts])

    def scores(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), num_routes) cosine of each text's TF-IDF vector with each route's centroid."""
        return self.vectors(texts) @ self.centroids.T


def hybrid_scores(dense: torch.Tensor, lexical: torch.Tensor, lexical_weight: float) -> torch.Tensor:
    """(1 - alpha) * dense + alpha * lexical (alpha = ``lexical_weight``; a route with no utterance stays -inf)."""
    if lexical_weight == 0:
        return dense
    return (1.0 - lexical_weight) * dense + lexical_weight * lexical


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
                 temperature: float = 0.05, top_m: int = 5, lexical_weight: float = 0.0,
                 utterance_embeddings: torch.Tensor | None = None) -> None:
        """``utterance_embeddings``: the encoder's unit-norm rows of every route's :meth:`Route.texts`, in
        order (computed elsewhere, e.g. cached); default: encoded here."""
        check_router_settings(top_k, threshold, temperature, top_m, lexical_weight)
        if not routes:
            raise AiflowError("The router has no specialists to route to (no route was given).")
        names = [r.name for r in routes]
        if len(set(names)) != len(names):
            raise AiflowError(f"Specialist names must be unique; got {names}.")
        self.routes = routes
        self.encoder = encoder
        self.top_k, self.threshold, self.temperature, self.top_m = top_k, threshold, temperature, top_m
        self.lexical_weight = lexical_weight
        texts, owners = route_texts(routes)
        self.owners = owners
        if utterance_embeddings is None:
            utterance_embeddings = encoder.encode(texts)
        if utterance_embeddings.shape[0] != len(texts):
            raise AiflowError(f"{utterance_embeddings.shape[0]} utterance embeddings for {len(texts)} route texts.")
        self.utterances = utterance_embeddings
        self.lexical = TfidfIndex(texts, owners, len(routes)) if lexical_weight > 0 else None

    def score_many(self, queries: list[str]) -> torch.Tensor:
        """(len(queries), routes) scores, the queries embedded in batches."""
        dense = route_scores_many(self.encoder.encode(queries), self.utterances, self.owners, len(self.routes), self.top_m)
        if self.lexical is None:
            return dense
        return hybrid_scores(dense, self.lexical.scores(queries), self.lexical_weight)

    def scores(self, query: str) -> dict[str, float]:
        values = self.score_many([query])[0]
        return {route.name: float(v) for route, v in zip(self.routes, values)}

    def route(self, query: str, top_k: int | None = None) -> RoutingDecision:
        scores = self.scores(query)
        k = self.top_k if top_k is None else top_k
        selected = select_routes(scores, k, self.threshold)
        weights = fusion_weights([scores[n] for n in selected], self.temperature)
        return RoutingDecision(scores, selected, dict(zip(selected, weights)), self.threshold, k)


def route_texts(routes: list[Route]) -> tuple[list[str], list[int]]:
    """Every route's texts in order and the index of the route each belongs to."""
    texts, owners = [], []
    for index, route in enumerate(routes):
        for text in route.texts():
            texts.append(text)
            owners.append(index)
    return texts, owners


def check_router_settings(top_k: int, threshold: float, temperature: float, top_m: int = 5,
                          lexical_weight: float = 0.0) -> None:
    if top_k < 1:
        raise AiflowError(f"collab.top_k is {top_k}; at least one specialist must be selectable (>= 1).")
    if not -1.0 <= threshold <= 1.0:
        raise AiflowError(f"collab.threshold is {threshold}; a cosine-similarity threshold lies in [-1, 1].")
    if temperature < 0:
        raise AiflowError(f"collab.temperature is {temperature}; it must be >= 0 (0: all weight on the best route).")
    if top_m < 1:
        raise AiflowError(f"collab.top_m is {top_m}; a route is scored by its top m >= 1 utterances.")
    if not 0.0 <= lexical_weight <= 1.0:
        raise AiflowError(f"collab.lexical_weight is {lexical_weight}; the lexical share of a route's score lies in [0, 1].")
