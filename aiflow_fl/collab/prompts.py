"""Prompts of the protocol's text steps: Mixture-of-Agents aggregation and the devices' revision.

* Synthesis (paper §IV-A step 3, "prompt-driven aggregation"): the aggregator system prompt of
  Mixture-of-Agents (togethercomputer/MoA; ANCHORS §4) — the server member is told it sees responses
  from several models, some possibly wrong, and writes one answer; the responses follow numbered
  "1. … 2. …", then the user's query comes as the user turn.
* Revision (step 4, broadcast): multi-agent debate's update prompt (Du et al.): the device gets the
  synthesis "as additional information" and answers again; its own earlier answer stays in the chat.
"""

from __future__ import annotations

MOA_AGGREGATOR_SYSTEM = (
    "You have been provided with a set of responses from various open-source models to the latest user query. "
    "Your task is to synthesize these responses into a single, high-quality response. It is crucial to critically "
    "evaluate the information provided in these responses, recognizing that some of it may be biased or incorrect. "
    "Your response should not simply replicate the given answers but should offer a refined, accurate, and "
    "comprehensive reply to the instruction. Ensure your response is well-structured, coherent, and adheres to the "
    "highest standards of accuracy and reliability.\n\nResponses from models:"
)

REVISION_TEMPLATE = (
    "This is the answer the server synthesized from all agents' answers:\n\n{synthesis}\n\n"
    "Using it as additional information, give your revised answer to the question: {query}"
)


def aggregator_messages(query: str, answers: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Chat messages for the server member: MoA system prompt with the numbered responses, then the query."""
    listed = "".join(f"\n{i}. {text}" for i, (_, text) in enumerate(answers, 1))
    return [{"role": "system", "content": MOA_AGGREGATOR_SYSTEM + listed}, {"role": "user", "content": query}]


def revision_messages(query: str, own_answer: str, synthesis: str) -> list[dict[str, str]]:
    """Chat messages for a device's revision: the query, its own answer, then the broadcast synthesis."""
    return [
        {"role": "user", "content": query},
        {"role": "assistant", "content": own_answer},
        {"role": "user", "content": REVISION_TEMPLATE.format(synthesis=synthesis, query=query)},
    ]
