"""Self-distillation data: the backbone's own greedy answers to generic chat instructions.

A draft member is judged at serving time on one thing: does its argmax agree with the verifier's on
the verifier's *own* answers to chat prompts. Text like the Python reference (pydoc) is far from
that distribution, so branches distilled only on it agree poorly on chat answers. Here we build the
matching data offline and without any download (self-distillation, as in Medusa-2 / EAGLE's
self-generated data and LayerSkip's early-exit training):

1. instructions = generic templates × everyday topics, plus questions on pydoc topic titles
   (:func:`instructions`); the benchmark's prompts are *not* in here — they stay held out;
2. the backbone answers each one greedily (:func:`self_answers`, batched, left-padded; cached in
   ``$AIFLOW_CACHE/selfdistill`` keyed by a fingerprint of the model's weights, the prompts and the
   answer length);
3. training batches are (prompt + answer) token ids with a mask of the positions whose next token is
   an answer token (:func:`self_batches`): the distillation loss is taken only where drafts work.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from aiflow_fl.errors import AiflowError

TEMPLATES = [
    "Explain {t} in simple terms.",
    "Write a short paragraph about {t}.",
    "Give three tips about {t}.",
    "What are the advantages and disadvantages of {t}?",
    "Describe {t} to a ten-year-old.",
    "List five facts about {t}.",
    "Why is {t} important?",
    "Write a short story that involves {t}.",
    "What are common misconceptions about {t}?",
    "How would you teach someone about {t}?",
    "Compare {t} with something similar and explain the differences.",
    "Write an email to a friend about {t}.",
]
# Everyday topics. Deliberately none of the benchmark's (sleep, language learning, bicycles,
# climate change, tea, exercise): those prompts stay held out for measuring agreement.
TOPICS = [
    "gardening", "photosynthesis", "the water cycle", "saving money", "volcanoes", "the internet",
    "public libraries", "recycling", "honey bees", "the moon landing", "healthy breakfast ideas",
    "time management", "electric cars", "the Roman Empire", "rainbows", "team work", "chess",
    "baking bread", "the human heart", "earthquakes", "job interviews", "renewable energy",
    "ocean tides", "vaccines", "the printing press", "writing a resume", "composting", "music practice",
    "first aid", "public speaking", "the solar system", "dinosaurs", "smartphones", "budget travel",
    "cooking pasta", "remote work", "birds migrating", "the stock market", "online privacy",
    "painting with watercolors", "camping safely", "friendship", "city parks", "coffee",
    "the immune system", "robots", "deserts", "reading books", "volunteering", "pet cats",
    "rain forests", "democracy", "the history of writing", "making a website", "mountains",
    "clean drinking water", "board games", "trains", "snowflakes", "kindness",
]
QUESTIONS = [
    "What is a good way to start the day?", "How do airplanes stay in the air?",
    "Write a haiku about autumn.", "What is the difference between weather and climate zones?",
    "Give me a recipe for a simple salad.", "How can I become a better listener?",
    "What should I pack for a weekend trip?", "Explain what a computer program is.",
    "Suggest a name for a new bakery and explain why.", "How do magnets work?",
    "What makes a good leader?", "Write a polite message declining an invitation.",
    "What is the capital of France and what is it known for?", "How do plants grow from seeds?",
    "Tell me a fun fact about octopuses.", "What are prime numbers?",
]


def instructions(count: int = 0, seed: int = 0, pydoc_titles: int = 24) -> list[str]:
    """Generic chat instructions (module docstring), shuffled with ``seed``; the first ``count``
    (0: all). Includes ``pydoc_titles`` questions on Python reference topics (offline data)."""
    items = [t.format(t=topic) for topic in TOPICS for t in TEMPLATES] + list(QUESTIONS)
    if pydoc_titles > 0:
        from pydoc_data.topics import topics

        names = sorted(topics)
        pick = random.Random(seed + 1).sample(names, min(pydoc_titles, len(names)))
        items += [f"Explain the Python concept '{name}' with a short example." for name in pick]
    random.Random(seed).shuffle(items)
    if count < 0:
        raise AiflowError(f"The number of self-distillation instructions must be ≥ 0 (got {count}).")
    return items[:count] if count else items


# Task instructions in MT-Bench's other first-turn categories (coding, math, reasoning, extraction,
# roleplay, stem): the everyday-topic templates above are mostly writing, so a draft trained on them
# alone sees little of how the model writes code, steps of arithmetic or extracted lists. Built
# from parts, none a benchmark prompt (a test checks).
CODE_TASKS = [
    "returns the largest of three numbers", "counts the vowels in a word", "computes the factorial of n",
    "removes duplicates from a list", "converts Celsius to Fahrenheit", "checks whether a number is even",
    "returns the sum of the digits of an integer", "finds the shortest word in a sentence",
    "merges two dictionaries", "returns the n-th Fibonacci number", "counts how often each word appears in a text",
    "checks whether a year is a leap year", "sorts a list of names alphabetically", "flattens a list of lists",
    "returns the average of a list of numbers", "capitalizes the first letter of every word",
    "finds the second largest number in a list", "checks whether two words are anagrams",
    "reads a text file and counts its lines", "returns the common elements of two lists",
]
CODE_CONCEPTS = [
    "a while loop", "a dictionary", "a list comprehension", "the len function", "a class", "an if statement",
    "a tuple", "a set", "the range function", "exception handling with try and except", "a lambda function",
    "string formatting with f-strings", "the import statement", "a default argument", "the zip function",
]
CODE_TEMPLATES = [
    "Write a Python function that {t}.", "Write a JavaScript function that {t}.",
    "Explain step by step how you would write a program that {t}.",
]
CONCEPT_TEMPLATES = ["What is {c} in Python? Give a short example.", "When should I use {c} in Python?"]
MATH_TEMPLATES = [
    "What is {a} multiplied by {b}? Explain how you got the answer.",
    "Add {a} and {b}, then divide the result by {c}. Show your work.",
    "What is the area of a rectangle that is {a} cm long and {c} cm wide?",
    "Is {b} a prime number? Explain why or why not.",
    "A shop sells pencils at {c} cents each. How much do {a} pencils cost?",
    "Convert {b} minutes into hours and minutes.",
    "What is the perimeter of a square with sides of {c} meters?",
    "Solve for y: {c}y - {a} = {b}.",
]
MATH_NUMBERS = [(12, 37, 4), (25, 91, 5), (48, 53, 6), (7, 143, 8), (64, 29, 3), (19, 113, 9), (36, 71, 2),
                (81, 97, 7), (14, 61, 11), (55, 89, 12)]
REASONING = [
    "If every {a} is a {b} and Sam owns a {a}, does Sam own a {b}? Explain.",
    "Some {b}s are expensive. Does that mean every {a} is expensive? Explain your reasoning.",
    "Which is heavier, a kilogram of {c} or a kilogram of feathers? Explain.",
    "Anna is older than Ben, and Ben is older than Carl. Who is the youngest, and why?",
    "What comes next in the sequence 2, 4, 8, 16, and why?",
    "If it takes five machines five minutes to make five widgets, how long do 100 machines take to make 100 widgets?",
    "A bat and a ball cost 1.10 dollars in total. The bat costs one dollar more than the ball. How much is the ball?",
    "Why do we see lightning before we hear thunder?",
    "If today is Tuesday, what day will it be in ten days? Explain.",
    "Why does a metal spoon feel colder than a wooden spoon at the same temperature?",
]
REASONING_PARTS = [("rose", "flower", "iron"), ("sparrow", "bird", "stones"), ("violin", "instrument", "bricks"),
                   ("oak", "tree", "sand"), ("salmon", "fish", "steel")]
EXTRACTION = [
    "Extract the names of the people from this sentence: {s}", "List the places mentioned in this text: {s}",
    "Summarize in one sentence: {s}", "What is the main point of this text? {s}",
]
SENTENCES = [
    "Maria met John in Berlin, and later they visited Rome with their friend Ahmed.",
    "The library will close early on Friday because the heating system is being repaired.",
    "Lucas drove from Madrid to Lisbon, while Emma took the ferry from Dover to Calais.",
    "The school raised 400 dollars at the spring fair, which will pay for new art supplies.",
    "Priya and Tom started a small bakery in Toronto after working together in Chicago.",
    "Our flight to Cairo was delayed by three hours, so we missed the museum tour.",
    "The council decided to plant 200 trees along the river to reduce flooding.",
    "After the concert in Vienna, Clara and Felix took a night train to Prague.",
]
ROLES = [
    ("a pirate captain", "greet your new crew"), ("a museum guide", "introduce a famous painting"),
    ("a chef on a cooking show", "present today's dish"), ("a detective", "explain how you solved a case"),
    ("a weather reporter", "give the forecast for a stormy weekend"), ("an astronaut", "describe your first day in space"),
    ("a shop assistant", "help a customer choose a gift"), ("a medieval knight", "describe your journey home"),
    ("a zookeeper", "introduce the animals to school children"), ("a radio host", "open the morning show"),
]
ROLE_TEMPLATES = ["Pretend you are {r} and {a}.", "You are {r}. In a few sentences, {a}."]
STEM = [
    "How does a refrigerator keep food cold?", "Why is the sky blue?", "How do vaccines train the immune system?",
    "What does a transistor do?", "How do solar panels produce electricity?", "Why do objects fall at the same rate in a vacuum?",
    "What is the difference between an atom and a molecule?", "How does a compass work?", "What causes the seasons?",
    "How do bridges carry heavy loads?", "What is DNA and why is it important?", "How does sound travel through air?",
]


def task_instructions(count: int = 0, seed: int = 0) -> list[str]:
    """Task instructions (coding, math, reasoning, extraction, roleplay, stem; the parts above), shuffled
    with ``seed``, the first ``count`` (0: all): what the everyday-topic :func:`instructions` lack of
    MT-Bench's categories."""
    if count < 0:
        raise AiflowError(f"The number of task instructions must be ≥ 0 (got {count}).")
    items = [t.format(t=task) for task in CODE_TASKS for t in CODE_TEMPLATES]
    items += [t.format(c=c) for c in CODE_CONCEPTS for t in CONCEPT_TEMPLATES]
    items += [t.format(a=a, b=b, c=c) for a, b, c in MATH_NUMBERS for t in MATH_TEMPLATES]
    # a set: the puzzles without {a}/{b}/{c} come out once per part, and are kept once
    items += sorted({t.format(a=a, b=b, c=c) for a, b, c in REASONING_PARTS for t in REASONING})
    items += [t.format(s=s) for s in SENTENCES for t in EXTRACTION]
    items += [t.format(r=r, a=a) for r, a in ROLES for t in ROLE_TEMPLATES]
    items += list(STEM)
    random.Random(seed).shuffle(items)
    return items[:count] if count else items


def model_fingerprint(model) -> str:
    """A short hash of a model's configuration and a few of its weights (tiny random models with
    the same config but different seeds get different fingerprints)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    params = list(model.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        digest.update(p.detach().float().flatten()[:4096].numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class SelfAnswers:
    """Prompt + greedy answer token ids of each instruction, and where each answer starts."""

    sequences: list[torch.Tensor]  # (T_i,) prompt ids followed by the answer ids
    prompt_lens: list[int]


def self_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
                 cache: bool = True, show_progress: bool = True) -> SelfAnswers:
    """The model's greedy answers to chat ``prompts`` (batched and left-padded; cached).

    Batching changes floating-point sums slightly, so a rare answer may differ from one generated
    alone; that does not matter for training data (the loss uses the teacher's logits on exactly
    these tokens). Runs on one torch thread: a decode step's GEMMs are a few rows, where a second
    thread saves little and, on shared cores, stalls (measured here: 300 vs 15 ms/token at batch 8).
    """
    from aiflow_fl.files import atomic_torch_save
    from aiflow_fl.generation import chat_input_ids
    from aiflow_fl.models import cache_dir

    if max_new_tokens < 1 or batch_size < 1:
        raise AiflowError(f"self_answers needs max_new_tokens ≥ 1 and batch_size ≥ 1 (got {max_new_tokens}, {batch_size}).")
    key = hashlib.sha256("\n".join([model_fingerprint(model), str(max_new_tokens), *prompts]).encode()).hexdigest()[:20]
    path = cache_dir() / "selfdistill" / f"{key}.pt"
    if cache and path.is_file():
        stored = torch.load(path)
        return SelfAnswers(stored["sequences"], stored["prompt_lens"])
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    pad = eos[0] if eos else 0
    encoded = [chat_input_ids(tokenizer, p)[0] for p in prompts]
    sequences: list[torch.Tensor] = []
    from aiflow_fl.progress import progress_bar

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with progress_bar(transient=not show_progress) as progress, torch.inference_mode():
            task = progress.add_task(f"self-distillation answers ({len(prompts)} prompts)", total=len(prompts))
            for i in range(0, len(encoded), batch_size):
                group = encoded[i:i + batch_size]
                width = max(len(x) for x in group)
                ids = torch.full((len(group), width), pad, dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for row, x in enumerate(group):
                    ids[row, width - len(x):] = x
                    mask[row, width - len(x):] = 1
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=eos or None, pad_token_id=pad)
                for row, x in enumerate(group):
                    answer = out[row, width:].tolist()
                    for j, token in enumerate(answer):  # cut after the first end-of-turn (padding follows it)
                        if token in eos:
                            answer = answer[: j + 1]
                            break
                    sequences.append(torch.cat([x, torch.tensor(answer, dtype=torch.long)]))
                progress.advance(task, len(group))
    finally:
        torch.set_num_threads(threads)
    result = SelfAnswers(sequences, [len(x) for x in encoded])
    if cache:
        atomic_torch_save({"sequences": result.sequences, "prompt_lens": result.prompt_lens}, path)
    return result


def padded(answers: SelfAnswers, rows: list[int], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) right-padded ids of ``rows`` and the (B, T) mask of positions whose *next* token is an
    answer token (right padding needs no attention mask: causal attention never looks ahead)."""
    width = max(len(answers.sequences[r]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        seq, start = answers.sequences[r], answers.prompt_lens[r]
        ids[i, : len(seq)] = seq
        mask[i, start - 1: len(seq) - 1] = True
    return ids, mask


def self_batches(answers: SelfAnswers, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled (ids, answer mask) batches of ``answers`` (see :func:`padded`)."""
    if not answers.sequences:
        raise AiflowError("No self-distillation sequences to train on (0 instructions).")
    generator = torch.Generator().manual_seed(seed)
    n = len(answers.sequences)
    size = max(1, min(batch_size, n))
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n - size + 1, size):
            yield padded(answers, order[i:i + size])
