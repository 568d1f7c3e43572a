"""What one ``aiflow serve`` process serves: members (batched engines), chains, tokenizer, readiness.

Loading happens in a background thread after the port is open, so ``/health`` answers 503 while
the members load and 200 once every model can answer.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiflow_fl.config import AiflowConfig
from aiflow_fl.errors import AiflowError
from aiflow_fl.serving.api.batch import MemberEngine
from aiflow_fl.serving.api.chains import ChainRunner, RemoteMember
from aiflow_fl.serving.api.collab import COLLAB_MODEL, CollabModel
from aiflow_fl.serving.api.errors import APIError
from aiflow_fl.serving.api.metrics import Metrics
from aiflow_fl.family.member import Member


def family_folder(path: str | Path) -> Path:
    """A family folder, or a run folder that holds one (``family/``), checked against its SHA-256 manifest."""
    path = Path(path)
    for candidate in (path, path / "family"):
        if (candidate / "family.json").is_file():
            from aiflow_fl.family.family import verify_folder

            verify_folder(candidate)  # a damaged folder stops here, before the port opens and before any load
            return candidate
    raise AiflowError(f"{path} is neither a family folder (family.json) nor a run folder with family/family.json "
                      "or specialists/; build one with `aiflow family build` or `aiflow demo`.")


def default_chains(specs: list[dict], available: set[str]) -> list[str]:
    """Smallest early-exit member drafting for the full member, and smallest>median>full with 3+."""
    ordered = [m["name"] for m in sorted(specs, key=lambda m: m.get("num_parameters", 0))
               if m["kind"] != "hpcd" and m["name"] in available]
    if len(ordered) < 2:
        return []
    chains = [f"{ordered[0]}>{ordered[-1]}"]
    if len(ordered) >= 3:
        chains.append(f"{ordered[0]}>{ordered[len(ordered) // 2]}>{ordered[-1]}")
    return chains


@dataclass
class Served:
    name: str
    kind: str  # member | chain | collab
    context: int
    engine: MemberEngine | ChainRunner | CollabModel
    created: int = field(default_factory=lambda: int(time.time()))


class ServerState:
    def __init__(self, cfg: AiflowConfig, family: str | None = None, members: list[str] | None = None,
                 remote: dict[str, str] | None = None, model: str | None = None, exit_layer: int | None = None,
                 api_key: str | None = None, remote_ca: str | None = None, tier: str | None = None,
                 collab_run: str | Path | None = None) -> None:
        self.cfg, self.api = cfg, cfg.serving.api
        self.collab_run = collab_run  # a run with specialists/: the protocol is served as the model `collab`
        self.family, self.only, self.remote = family, list(members or []), dict(remote or {})
        self.model_name, self.exit_layer, self.api_key, self.remote_ca, self.tier = model, exit_layer, api_key, remote_ca, tier
        self.metrics = Metrics()
        self.models: dict[str, Served] = {}
        self.members: dict[str, Member] = {}
        self.tokenizer = None
        self.tier_sessions = None
        self.ready = False
        self.failure: str | None = None
        self.pool = ThreadPoolExecutor(max(1, self.api.chain_workers), thread_name_prefix="chain")

    # ------------------------------------------------------------------ loading
    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self._load_guarded, name="load", daemon=True)
        thread.start()
        return thread

    def _load_guarded(self) -> None:
        try:
            self.load()
        except Exception as exc:  # /health reports it; the process stays up so the message can be read
            self.failure = f"{type(exc).__name__}: {exc}"
            print(f"aiflow serve: loading failed: {self.failure}", flush=True)

    def load(self) -> None:
        from aiflow_fl.layers import use_inference_kernels
        from aiflow_fl.serving.build import eos_ids
        from aiflow_fl.serving.server import TierSessions

        specs: list[dict] = []
        if self.family:
            from aiflow_fl.family.family import describe_folder
            from aiflow_fl.family.member import load_family_member

            folder = family_folder(self.family)
            specs = describe_folder(folder)["members"]
            names = self.only or [m["name"] for m in specs if m["name"] not in self.remote]
            loaded = [load_family_member(str(folder), name) for name in names]
            if self.cfg.serving.adapter:  # a federated run's trained weights (`aiflow demo` serves its run this way)
                from aiflow_fl.federated.run import fold_run_update

                fold_run_update(loaded, self.cfg.serving.adapter)
            self.tokenizer = loaded[0].tokenizer
        elif self.collab_run and not self.model_name:
            loaded = []  # a run with specialists and no family: only `collab` is served
        else:
            from aiflow_fl.models import load_backbone
            from aiflow_fl.family.member import early_exit_member

            backbone = load_backbone(self.model_name or self.cfg.model.name)
            layers = backbone.model.config.num_hidden_layers
            k = layers if self.exit_layer is None else self.exit_layer
            loaded = [early_exit_member(backbone.model, "full" if k == layers else f"exit-{k}", backbone.tokenizer)]
            self.tokenizer = backbone.tokenizer
        for member in loaded:
            use_inference_kernels(member.model)  # same weights, faster few-row and batched products
            self.members[member.name] = member
            context = self.api.max_model_len or int(getattr(member.model.config, "max_position_embeddings", 2048))

            def on_step(size: int, seconds: float, name: str = member.name) -> None:
                self.metrics.batch_size.labels(name).observe(size)

            engine = MemberEngine(member.model, self.api.max_batch, member.name, on_step=on_step)
            self.models[member.name] = Served(member.name, "member", context, engine)
        contexts = {name: served.context for name, served in self.models.items()}
        self.tier_sessions = TierSessions(self.members, contexts, self.api.max_sessions,
                                          default=self.only[0] if self.only else None)
        remote_members = {name: self._remote(name, url) for name, url in self.remote.items()}
        chain_names = list(self.cfg.serving.chains) or default_chains(specs, set(self.members) | set(remote_members))
        for chain_name in chain_names:
            parts = chain_name.split(">")
            missing = [p for p in parts if p not in self.members and p not in remote_members]
            if not 2 <= len(parts) <= 3 or missing:
                raise AiflowError(f"serving.chains entry '{chain_name}' must join 2-3 members with '>' from "
                                  f"{', '.join(list(self.members) + list(remote_members))} (missing: {', '.join(missing) or '-'}).")
            if parts[0] not in self.members:
                raise AiflowError(f"Chain '{chain_name}': its drafting member {parts[0]} must run in this process.")
            chain_members = [self.members.get(p) or remote_members[p] for p in parts]
            last = chain_members[-1]
            eos = eos_ids(last.model, self.tokenizer) if isinstance(last, Member) else eos_ids(self.members[parts[0]].model, self.tokenizer)
            runner = ChainRunner(chain_name, chain_members, self.cfg.serving, eos, self.pool, self.metrics)
            context = min([contexts[p] for p in parts if p in contexts] +
                          [int(remote_members[p].spec["max_len"]) for p in parts if p in remote_members])
            self.models[chain_name] = Served(chain_name, "chain", context, runner)
        if self.collab_run:
            self._load_collab()
        if self.tokenizer is not None and self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.ready = True

    def _load_collab(self) -> None:
        from aiflow_fl.serving.api.collab import open_collab

        if COLLAB_MODEL in self.models:
            raise AiflowError(f"A member or chain is named '{COLLAB_MODEL}', the name of the collaboration model; rename it.")
        served = open_collab(self.cfg, Path(self.collab_run))
        self.models[COLLAB_MODEL] = Served(COLLAB_MODEL, "collab", served.context, served)
        if self.tokenizer is None:
            self.tokenizer = served.tokenizer

    def _remote(self, name: str, url: str) -> RemoteMember:
        from aiflow_fl.serving.server import RemoteTier

        probe = RemoteTier(url, member=name, api_key=self.api_key, ca_file=self.remote_ca, timeout_s=self.cfg.serving.timeout_s)
        info = probe.info
        probe._client.close()
        return RemoteMember(name, url, info, self.api_key, self.remote_ca)

    # ------------------------------------------------------------------ requests
    def model(self, name: str) -> Served:
        if name not in self.models:
            raise APIError(404, f"The model '{name}' does not exist. This server has: {', '.join(self.models)}.",
                           "model", "model_not_found")
        return self.models[name]

    def eos(self, served: Served) -> frozenset[int]:
        from aiflow_fl.serving.build import eos_ids

        if isinstance(served.engine, ChainRunner):
            return frozenset(served.engine.eos)
        return frozenset(eos_ids(self.members[served.name].model, self.tokenizer))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "This model's tokenizer has no chat template; use /v1/completions.", "messages")
        from aiflow_fl.generation import chat_template_ids

        return chat_template_ids(self.tokenizer, messages)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        vocab = len(self.tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token ids must be in 0..{vocab - 1} (got {bad[0]})", "prompt")
        return list(prompt)

    def close(self) -> None:
        for served in self.models.values():
            if isinstance(served.engine, (MemberEngine, CollabModel)):
                served.engine.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
