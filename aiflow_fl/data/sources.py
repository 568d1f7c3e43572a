"""Private text for federated devices: documents with a *domain* label, tokenized into fixed-length chunks.

Sources (``data.source``):

* ``pydoc``  — the Python language reference topics shipped with CPython (``pydoc_data.topics``);
  domain = topic (``assert``, ``class``, ``string-methods``, ...).
* ``stdlib`` — the Python sources of a fixed set of standard-library packages; domain = package.
* a path to a user file or folder: ``.jsonl`` (one object per line with ``text``, or an instruction
  pair ``instruction``/``prompt`` + ``response``/``output``/``completion``; optional ``domain``) or
  ``.txt`` (documents separated by blank lines; domain = file name). A folder takes every ``.jsonl``
  and ``.txt`` file in it.

Tokenization: each domain's documents are joined with the tokenizer's EOS token and cut into chunks of
``seq_len`` tokens (the tail shorter than ``seq_len`` is dropped), so a chunk never mixes domains —
that is what lets a partitioner give devices genuinely different data.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from aiflow_fl.errors import AiflowError

BUILTIN_SOURCES = ("pydoc", "stdlib")
# Standard-library packages used by the ``stdlib`` source (each one a domain); chosen to differ in
# vocabulary (networking, parsing, concurrency, testing, storage, text) and to exist on every CPython.
STDLIB_PACKAGES = ("asyncio", "email", "http", "json", "logging", "unittest", "xml", "concurrent",
                   "importlib", "urllib", "sqlite3", "collections", "multiprocessing", "tomllib")
STDLIB_CHARS_PER_DOMAIN = 60_000


@dataclass
class Document:
    domain: str
    text: str


@dataclass
class TokenChunks:
    """Fixed-length token chunks and the domain each came from."""

    input_ids: torch.Tensor  # (N, seq_len), int64
    domains: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, indices: list[int] | torch.Tensor) -> "TokenChunks":
        index = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.long)
        return TokenChunks(self.input_ids[index], [self.domains[i] for i in index.tolist()])

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def _pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(name, text) for name, text in sorted(topics.items())]


def _stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for package in STDLIB_PACKAGES:
        folder = root / package
        files = sorted(folder.rglob("*.py")) if folder.is_dir() else []
        budget = STDLIB_CHARS_PER_DOMAIN
        for path in files:
            if "test" in path.parts[len(root.parts):-1] or budget <= 0:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")[:budget]
            budget -= len(text)
            docs.append(Document(package, text))
    return docs


def _instruction_text(obj: dict, tokenizer) -> str | None:
    prompt = obj.get("instruction", obj.get("prompt"))
    answer = obj.get("response", obj.get("output", obj.get("completion")))
    if not (isinstance(prompt, str) and isinstance(answer, str)):
        return None
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"### Instruction:\n{prompt}\n\n### Response:\n{answer}"


def _jsonl_documents(path: Path, tokenizer) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AiflowError(
                    f"{path} line {number} is not valid JSON ({exc.msg}). Each line of a .jsonl data file "
                    "must be one JSON object with 'text', or 'instruction'/'prompt' plus "
                    "'response'/'output'/'completion', and optionally 'domain'."
                ) from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                text = _instruction_text(obj, tokenizer) if isinstance(obj, dict) else None
            if text is None:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise AiflowError(
                    f"{path} line {number} has no text: got {keys}. Allowed: a string 'text', or "
                    "'instruction'/'prompt' with 'response'/'output'/'completion' (strings)."
                )
            domain = obj.get("domain", obj.get("topic", path.stem))
            docs.append(Document(str(domain), text))
    return docs


def _text_documents(path: Path) -> list[Document]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AiflowError(f"{path} is not UTF-8 text; a .txt data file must be UTF-8 plain text.") from None
    return [Document(path.stem, part.strip()) for part in raw.split("\n\n") if part.strip()]


def load_documents(source: str, tokenizer=None) -> list[Document]:
    """Documents of a builtin source name or a user .jsonl/.txt file or folder (see module doc)."""
    if source == "pydoc":
        docs = _pydoc_documents()
    elif source == "stdlib":
        docs = _stdlib_documents()
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".txt"))
            if not files:
                raise AiflowError(f"Data folder {path} holds no .jsonl or .txt files.")
        elif path.is_file():
            files = [path]
        else:
            raise AiflowError(
                f"data.source '{source}' is neither a builtin source ({', '.join(BUILTIN_SOURCES)}) nor an "
                "existing .jsonl/.txt file or folder."
            )
        docs = []
        for file in files:
            if file.suffix == ".jsonl":
                docs += _jsonl_documents(file, tokenizer)
            elif file.suffix == ".txt":
                docs += _text_documents(file)
            else:
                raise AiflowError(f"Data file {file} has suffix '{file.suffix}'; allowed: .jsonl, .txt.")
    if not docs:
        raise AiflowError(f"data.source '{source}' contains no documents.")
    return docs


def tokenize_documents(docs: list[Document], tokenizer, seq_len: int) -> TokenChunks:
    """Join each domain's documents with EOS and cut them into ``seq_len``-token chunks."""
    if seq_len < 2:
        raise AiflowError(f"data.seq_len is {seq_len}; it must be at least 2 (a next-token target needs 2 tokens).")
    eos = tokenizer.eos_token_id
    by_domain: dict[str, list[int]] = {}
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    for doc, ids in zip(docs, encoded):
        by_domain.setdefault(doc.domain, []).extend([*ids, eos])
    rows, domains = [], []
    for domain in sorted(by_domain):
        stream = by_domain[domain]
        for start in range(0, len(stream) - seq_len + 1, seq_len):
            rows.append(stream[start:start + seq_len])
            domains.append(domain)
    if not rows:
        raise AiflowError(
            f"The data holds fewer than data.seq_len={seq_len} tokens in every domain, so no training chunk "
            "can be made; give more text or a smaller data.seq_len."
        )
    return TokenChunks(torch.tensor(rows, dtype=torch.long), domains)


def _cache_key(source: str, tokenizer, seq_len: int) -> str:
    h = hashlib.sha256()
    h.update(f"{source}|{seq_len}|{tokenizer.name_or_path}|{len(tokenizer)}|v1".encode())
    path = Path(source).expanduser()
    for file in sorted(path.rglob("*") if path.is_dir() else [path] if path.is_file() else []):
        st = file.stat()
        h.update(f"{file}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def load_chunks(source: str, tokenizer, seq_len: int) -> TokenChunks:
    """Tokenized chunks of a source, cached on disk (every client process of every round needs them)."""
    from aiflow_fl.files import atomic_torch_save
    from aiflow_fl.models import cache_dir

    path = cache_dir() / "data" / f"{_cache_key(source, tokenizer, seq_len)}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            return TokenChunks(saved["input_ids"], list(saved["domains"]))
        except Exception:  # a corrupt cache is rebuilt, never trusted
            pass
    chunks = tokenize_documents(load_documents(source, tokenizer), tokenizer, seq_len)
    atomic_torch_save({"input_ids": chunks.input_ids, "domains": chunks.domains}, path)
    return chunks
