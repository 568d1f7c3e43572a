"""Router dev set for the collaboration bench: the TRAINING split only (held-out documents unused).

A fifth of the training documents (by sha1 of "dev/<domain>/<doc>") give dev queries (32-token window
prefixes, at most 3 per document, 40 per domain); route utterances come from the other training
documents as the bench builds them (512 query-shaped prefixes; a variant with every 48-token window).
Prints top-1 accuracy of MiniLM top-m mean, of hybrid MiniLM + TF-IDF per lexical weight, and of kNN
voting. Run: PYTHONPATH=. python benchmarks/_collab_router_dev.py (about a minute)."""
import hashlib
import time

import torch

from aiflow_benchmarks.collaboration import DOMAINS, PREFIX_TOKENS, RECIPE, SOURCES, is_heldout
from aiflow_fl.collab.router import Route, route_texts, route_scores_many, TfidfIndex, hybrid_scores
from aiflow_fl.collab.embed import shared_encoder
from aiflow_fl.models import load_tokenizer
from aiflow_fl.config import load_config
torch.set_num_threads(1)
cfg = load_config(); tok = load_tokenizer(cfg.model.name)
seq = RECIPE["seq_len"]
routes_q, routes_full, queries, labels = [], [], [], []
for r, d in enumerate(DOMAINS):
    train, dev = [], []
    for doc_id, text in SOURCES[d]():
        if is_heldout(d, doc_id): continue
        ids = tok(text, add_special_tokens=False).input_ids
        wins = [ids[s:s + seq] for s in range(0, len(ids) - seq + 1, seq)][:6]
        if int(hashlib.sha1(f"dev/{d}/{doc_id}".encode()).hexdigest()[:8], 16) % 5 == 0:
            dev += [w[:PREFIX_TOKENS] for w in wins[:3]]
        else:
            train += wins
    step = max(1, len(train) // 512)
    sel = train[::step][:512]
    routes_q.append([tok.decode(w[:PREFIX_TOKENS]) for w in sel])
    routes_full.append([tok.decode(w) for w in train])
    q = [tok.decode(w) for w in dev][:40]
    queries += q; labels += [r] * len(q)
    print(d, len(train), "train windows", len(dev), "dev windows")
enc = shared_encoder(); lab = torch.tensor(labels)
Q = enc.encode(queries)
for tag, utt in [("512 prefixes", routes_q), ("all windows 48t", routes_full)]:
    routes = [Route(d, "x", u) for d, u in zip(DOMAINS, utt)]
    texts, owners = route_texts(routes)
    t = time.time(); E = enc.encode(texts); print(tag, len(texts), "encode", round(time.time() - t, 1))
    lex = TfidfIndex(texts, owners, len(routes)).scores(queries)
    for m in (1, 5, 10, 20):
        dense = route_scores_many(Q, E, owners, len(routes), m)
        print(tag, "top_m", m, " ".join(f"a={a}:{float((hybrid_scores(dense, lex, a).argmax(1) == lab).float().mean()):.3f}" for a in (0, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)))
    # kNN vote
    sims = Q @ E.T; own = torch.tensor(owners)
    for k in (5, 15):
        idx = sims.topk(k, 1).indices
        votes = torch.zeros(len(queries), len(routes)).scatter_add_(1, own[idx], torch.ones_like(idx, dtype=torch.float))
        print(tag, "knn", k, float((votes.argmax(1) == lab).float().mean()))
