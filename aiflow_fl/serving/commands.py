"""``aiflow generate`` and ``aiflow serve``: chains from the config, family folders or early exits."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

from aiflow_fl.config import AiflowConfig, LinkConfig
from aiflow_fl.errors import AiflowError
from aiflow_fl.layers import use_inference_kernels
from aiflow_fl.serving.build import eos_ids, local_chain, verifier_entries
from aiflow_fl.serving.chain import Chain
from aiflow_fl.serving.link import Link
from aiflow_fl.family.member import Member, early_exit_member, early_exit_members, load_family_member
from aiflow_fl.serving.tiers import LocalTier, draft_vocabulary

TIER_NAMES = ("device", "edge", "cloud")


def check_tiers(tiers: list[str]) -> list[str]:
    """Tiers in chain order: device first, then edge and/or cloud (either may be skipped)."""
    if not tiers or tiers[0] != "device" or len(set(tiers)) != len(tiers) or any(t not in TIER_NAMES for t in tiers) \
            or [t for t in TIER_NAMES if t in tiers] != tiers:
        raise AiflowError(
            f"Tiers {','.join(tiers) or '(none)'} are not a chain: give 'device' first, then 'edge' and/or "
            "'cloud' in that order (device | device,edge | device,cloud | device,edge,cloud)."
        )
    return tiers


def make_link(name: str, cfg: LinkConfig, seed: int = 0) -> Link:
    return Link(name, cfg.latency_ms, cfg.bandwidth_mbps, cfg.jitter_ms, seed)


def chain_links(tiers: list[str], cfg: AiflowConfig) -> list[Link]:
    """device->edge uses serving.edge_link; edge->cloud uses cloud_link; device->cloud adds both."""
    s, links = cfg.serving, []
    for low, high in zip(tiers, tiers[1:]):
        if low == "device" and high == "edge":
            links.append(make_link("device-edge", s.edge_link, s.seed))
        elif low == "edge":
            links.append(make_link("edge-cloud", s.cloud_link, s.seed + 1))
        else:  # device straight to the cloud: both hops
            both = LinkConfig(s.edge_link.latency_ms + s.cloud_link.latency_ms,
                              min([b for b in (s.edge_link.bandwidth_mbps, s.cloud_link.bandwidth_mbps) if b > 0], default=0.0),
                              s.edge_link.jitter_ms + s.cloud_link.jitter_ms)
            links.append(make_link("device-cloud", both, s.seed))
    return links


def resolve_members(cfg: AiflowConfig, tiers: list[str], family: str | None) -> tuple[list[Member], object]:
    """Members for ``tiers``: from a family folder, or early exits (``serving.exits``) of ``model.name``."""
    s = cfg.serving
    if family:
        from aiflow_fl.family.family import describe_folder

        specs = describe_folder(family)["members"]
        names = list(s.members) or _default_family_members([m for m in specs], len(tiers))
        if len(names) != len(tiers):
            raise AiflowError(f"serving.members lists {len(names)} members for {len(tiers)} tiers ({','.join(tiers)}).")
        members = [load_family_member(family, name) for name in names]
        return members, members[0].tokenizer
    from aiflow_fl.models import load_backbone

    loaded = load_backbone(cfg.model.name)
    exits = list(s.exits) or _default_exits(loaded.model.config.num_hidden_layers, len(tiers))
    if len(exits) != len(tiers) - 1:
        raise AiflowError(
            f"--exits {','.join(map(str, exits))} gives {len(exits) + 1} tiers (each exit + the full model) but "
            f"--tiers names {len(tiers)}; give {len(tiers) - 1} exit(s)."
        )
    return early_exit_members(loaded.model, exits, loaded.tokenizer), loaded.tokenizer


def _default_family_members(specs: list[dict], count: int) -> list[str]:
    """Smallest member drafts, largest verifies last, the median one in between."""
    ordered = [m["name"] for m in sorted(specs, key=lambda m: m.get("num_parameters", 0)) if m["kind"] != "hpcd"]
    if len(ordered) < count:
        raise AiflowError(f"The family has {len(ordered)} early-exit/full members; {count} tiers need {count}.")
    return [ordered[0]] + ([ordered[len(ordered) // 2]] if count == 3 else []) + ([ordered[-1]] if count > 1 else [])


def _default_exits(layers: int, count: int) -> list[int]:
    return [layers // 2] if count == 2 else [layers // 3, 2 * layers // 3] if count == 3 else []


def build_chain(cfg: AiflowConfig, tiers: list[str], family: str | None = None, remote: dict[str, str] | None = None,
                cores: list[int] | None = None) -> tuple[Chain, object]:
    """The chain the config describes; tiers named in ``remote`` are served by ``aiflow serve``."""
    s = cfg.serving
    tiers = check_tiers(tiers)
    remote = remote or {}
    if "device" in remote:
        raise AiflowError("The device tier runs here; only edge and cloud can be remote.")
    members, tokenizer = resolve_members(cfg, tiers, family)
    for member in members:  # faster few-row products for decoding and verification (same weights)
        use_inference_kernels(member.model)
    eos = eos_ids(members[-1].model, tokenizer)
    links = chain_links(tiers, cfg)
    blocks = [1] + ([s.cloud_block] if len(tiers) == 3 else [])
    options = dict(draft_len=s.draft_len, adaptive=s.adaptive, min_draft=s.min_draft_len, max_draft=max(s.max_draft_len, s.draft_len),
                   blocks=blocks, temperature=s.temperature, pipelined=s.pipelined, seed=s.seed, cores=cores,
                   confidence=s.draft_confidence, cost_aware=s.cost_aware and not s.pipelined, probe_every=s.probe_every, probe_budget=s.probe_budget,
                   on_verifier_loss=s.on_verifier_loss)
    if len(tiers) == 2 and s.draft_head != "off" and not remote:
        from aiflow_fl.serving.build import head_chain
        from aiflow_fl.serving.draft_head import resolve_draft_head

        head = resolve_draft_head(s.draft_head, members[-1].model)
        if head is not None:  # the feature-level head drafts for the last tier (it reads that tier's features)
            options.update(blocks=[1], confidence=0.0)
            return head_chain(head, members[-1], links=links, eos_token_ids=eos, **options), tokenizer
    elif s.draft_head not in ("off", "auto"):
        raise AiflowError(f"serving.draft_head={s.draft_head} drafts for a local verifier in a 2-tier chain (device,edge or "
                          f"device,cloud); got tiers {','.join(tiers)}{' with remote ' + ','.join(remote) if remote else ''}.")
    if not remote:
        return local_chain(members, reuse=s.reuse, draft_vocab=s.draft_vocab, links=links, eos_token_ids=eos, **options), tokenizer
    from aiflow_fl.serving.server import RemoteTier

    vocab = draft_vocabulary(members[0].model.config.vocab_size, s.draft_vocab, eos)
    kept, above, unverified = ["device"], [], []  # above: the verifiers kept, a RemoteTier or a local Member
    for name, member in zip(tiers[1:], members[1:]):
        if name not in remote:
            above.append(member)
        else:
            try:
                above.append(RemoteTier(remote[name], timeout_s=s.timeout_s, name=name))  # reports exit_layer / shared_layers
            except AiflowError as exc:  # an unreachable tier: fail, or (device policy) go on without it, unverified
                if s.on_verifier_loss == "fail":
                    raise AiflowError(f"The {name} tier is unreachable ({exc}); serving.on_verifier_loss=fail.") from None
                warnings.warn(f"skipping the {name} tier: {exc}", stacklevel=2)
                unverified.append(name)
                continue
        kept.append(name)
    built: list = [LocalTier(members[0], 0, vocab, draft=True)]
    for tier, entry in zip(above, verifier_entries([members[0], *above], s.reuse, options["cost_aware"])):
        if isinstance(tier, RemoteTier):
            tier.entry = entry
            built.append(tier)
        else:
            built.append(LocalTier(tier, entry))
    options["blocks"] = [1] + ([s.cloud_block] if len(kept) == 3 else [])
    chain = Chain(built, links=chain_links(kept, cfg), eos_token_ids=eos, **options)
    if unverified:
        chain.verified = False
        chain.warnings.append(f"tier(s) {', '.join(unverified)} unreachable at the start: output not checked by them")
    return chain, tokenizer


def generate(cfg: AiflowConfig, prompt: str, tiers: list[str], family: str | None, remote: dict[str, str]) -> dict:
    """Stream the answer to stdout, then print the acceptance statistics table. Returns the stats."""
    from rich.console import Console
    from rich.table import Table

    from aiflow_fl.generation import chat_input_ids

    chain, tokenizer = build_chain(cfg, tiers, family, remote)
    ids = chat_input_ids(tokenizer, prompt)
    shown: list[int] = []
    printed = ""

    def stream(tokens: list[int]) -> None:
        nonlocal printed
        shown.extend(tokens)
        text = tokenizer.decode(shown, skip_special_tokens=True)
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text

    with torch.inference_mode():
        result = chain.generate(ids, cfg.serving.max_new_tokens, on_tokens=stream)
    sys.stdout.write("\n")
    console = Console(stderr=True)
    table = Table(title=f"{','.join(tiers)}: {result.stats['new_tokens']} tokens in {result.seconds:.2f} s "
                        f"= {result.stats['tokens_per_s']} tokens/s")
    for column in ("tier", "entry layer", "accepted/drafted", "mean accepted len", "calls", "bytes up/down", "link delay s"):
        table.add_column(column)
    for row in result.stats["tiers"]:
        if "accepted" in row:
            table.add_row(row["tier"], str(row["entry_layer"]), f"{row['accepted']}/{row['drafted']} ({row['acceptance_rate']:.0%})",
                          str(row["mean_accepted_len"]), str(row["calls"]), f"{row['bytes_up']}/{row['bytes_down']}", str(row["delay_s"]))
        else:
            table.add_row(row["tier"] + " (drafts)", str(row["entry_layer"]), "-", "-", "-", "-", "-")
    console.print(table)
    for line in result.stats["warnings"]:
        console.print(f"[yellow]warning:[/] {line}")
    if not result.stats["verified"]:
        console.print("[red]UNVERIFIED:[/] a verifier was lost; this answer is the device member's alone "
                      "(serving.on_verifier_loss=device). Exit status 3.")
    return result.stats


def parse_remote(items: list[str]) -> dict[str, str]:
    """``["edge=http://127.0.0.1:8001", ...]`` -> {"edge": url}."""
    out = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or name not in ("edge", "cloud"):
            raise AiflowError(f"--remote '{item}' must be edge=URL or cloud=URL (e.g. edge=http://127.0.0.1:8001).")
        out[name] = url
    return out


def parse_member_remote(items: list[str]) -> dict[str, str]:
    """``["full=http://127.0.0.1:8001", ...]`` -> {"full": url} (``aiflow serve --remote``: by member name)."""
    out = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise AiflowError(f"--remote '{item}' must be MEMBER=URL (e.g. full=http://127.0.0.1:8001).")
        out[name] = url
    return out
