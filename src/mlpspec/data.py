"""Training data: text corpora in, token windows and the base model's own generations out.

Stage 1 reads text (local .txt/.py/.md/.rst, .jsonl, .parquet, folders of them, a hub
dataset name, or `default`: the Python standard library's source plus Debian's
python3.11-doc sources when installed). It is tokenized once into a flat array of ids,
documents separated by EOS, cached on disk. Stage 2 cuts prompts from that stream, lets
the base model continue them, and writes the results to disk in shards, so generation
resumes where it stopped and can be reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import MLPSpecError
from .fileio import atomic_write
from .text import user_turn_opening, write_prompt_file

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
DEBIAN_PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def default_corpus_files() -> list[Path]:
    """The offline corpus: the standard library's own source (third-party packages in
    site-packages stay unseen, for evaluation), plus Debian's python3.11-doc sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    if DEBIAN_PYTHON_DOCS.is_dir():
        files += sorted(DEBIAN_PYTHON_DOCS.rglob("*.txt"))
    return files


def _files_under(folder: Path) -> list[Path]:
    known = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in known)


def resolve_data(specs: list[str]) -> tuple[list[Path], list[str]]:
    """Split --data arguments into local files and hub dataset names."""
    files, hub = [], []
    for spec in specs:
        path = Path(spec)
        if spec == "default":
            files += default_corpus_files()
        elif path.is_dir():
            found = _files_under(path)
            if not found:
                raise MLPSpecError(f"{spec}: no .txt/.py/.md/.rst/.jsonl/.json/.parquet files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        elif path.suffix or spec.startswith((".", "/")) or spec.count("/") > 1:
            raise MLPSpecError(f"{spec}: no such file or folder")
        else:
            hub.append(spec)  # e.g. "org/name": a hub dataset
    return files, hub


def _texts_from_table(table, where: str, text_field: str, tokenizer) -> list[str]:
    if text_field in table.column_names:
        return [t for t in table[text_field] if isinstance(t, str) and t]
    if "messages" in table.column_names:
        if getattr(tokenizer, "chat_template", None) is None:
            raise MLPSpecError(f"{where}: chat 'messages' need a tokenizer with a chat template")
        return [tokenizer.apply_chat_template(m, tokenize=False) for m in table["messages"]]
    raise MLPSpecError(
        f"{where}: no field {text_field!r} (nor 'messages'); columns are {', '.join(table.column_names)}"
    )


def load_texts(specs: list[str], tokenizer, text_field: str = "text") -> list[str]:
    """Every document of the given data, as text. Plain text files need no `datasets`."""
    files, hub = resolve_data(specs)
    texts: list[str] = []
    by_kind: dict[str, list[str]] = {}
    for f in files:
        kind = "json" if f.suffix in JSON_SUFFIXES else "parquet" if f.suffix in PARQUET_SUFFIXES else "text"
        by_kind.setdefault(kind, []).append(str(f))
    for kind, paths in by_kind.items():
        if kind == "text":  # one document per file, read directly: faster than a dataset
            texts += [t for t in (_read_text(Path(p)) for p in paths) if t]
            continue
        datasets = _datasets()
        try:
            table = datasets.load_dataset(kind, data_files=paths, split="train")
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
            raise MLPSpecError(f"could not read {kind} data {paths[0]}...: {' '.join(str(e).split())[:300]}") from None
        texts += _texts_from_table(table, paths[0] if len(paths) == 1 else f"{len(paths)} {kind} files", text_field, tokenizer)
    for name in hub:
        datasets = _datasets()
        try:
            table = datasets.load_dataset(name, split="train")
        except Exception as e:  # the hub raises many types; all mean "cannot have it"
            raise MLPSpecError(f"{name}: not a local file, and the hub dataset could not be loaded ({e.__class__.__name__})") from None
        texts += _texts_from_table(table, name, text_field, tokenizer)
    if not texts:
        raise MLPSpecError(f"no text found in --data {' '.join(specs)}")
    return texts


def _datasets():
    import datasets  # only for tables and the hub; a machine with plain text files can lack it

    datasets.disable_progress_bars()
    return datasets


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_text(encoding="utf-8", errors="replace")


def _fingerprint(specs: list[str], tokenizer, text_field: str) -> str:
    files, hub = resolve_data(specs)
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(("hub:" + ",".join(hub) + f"\nfield:{text_field}\n").encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else
             json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def tokenized_corpus(specs: list[str], tokenizer, cache: Path, text_field: str = "text") -> np.ndarray:
    """The corpus as one int32 array of token ids, each document followed by EOS,
    tokenized once and cached under `cache`."""
    file = Path(cache) / f"tokens-{_fingerprint(specs, tokenizer, text_field)}.npy"
    if file.is_file():
        return np.load(file, mmap_mode="r")
    texts = load_texts(specs, tokenizer, text_field)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pieces = []
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start : start + 256], add_special_tokens=False).input_ids:
            pieces.append(np.asarray(ids + [eos], dtype=np.int32))
    tokens = np.concatenate(pieces)
    atomic_write(file, lambda f: np.save(f, tokens))
    return tokens


@dataclass
class EpochOrder:
    """Which of `count` items the run's g-th draw is: every epoch visits them all in a
    fresh seeded shuffle, so draw g is a pure function of g and a resumed run reads the
    same data."""

    count: int
    seed: int

    def __getitem__(self, g: int) -> int:
        epoch, k = divmod(int(g), self.count)
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self._perm[k])


@dataclass
class Windows:
    """Fixed-length windows over a token stream, visited in a seeded random order; window
    g of the run is a pure function of g, so a resumed run reads the same data."""

    tokens: np.ndarray
    length: int
    seed: int

    def __post_init__(self):
        self.count = len(self.tokens) // self.length
        if self.count == 0:
            raise MLPSpecError(
                f"the data has {len(self.tokens)} tokens, fewer than one window of {self.length}"
            )
        self.order = EpochOrder(self.count, self.seed)

    def get(self, indices) -> torch.Tensor:
        rows = []
        for g in indices:
            start = self.order[g] * self.length
            rows.append(torch.from_numpy(np.asarray(self.tokens[start : start + self.length], dtype=np.int64)))
        return torch.stack(rows)  # b length


def split_heldout(tokens: np.ndarray, fraction: float = 0.01, minimum: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): the held-out part is the stream's tail."""
    n = min(max(int(len(tokens) * fraction), minimum), len(tokens) // 2)
    return tokens[:-n], tokens[-n:]


def generate_shards(
    model,
    tokenizer,
    tokens: np.ndarray,
    out: Path,
    shards,
    batch_size: int,
    prompt_length: int = 64,
    new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int | None = 10,
    chat: bool = False,
    seed: int = 0,
    progress=None,
    write: bool = True,
    prompts: list | None = None,
) -> list[Path]:
    """Stage 2's data: the base model continues prompts cut from `tokens`, or answers
    `prompts` (text or chat messages, as text.read_prompt_file gives) where those are given.

    Makes the shards numbered in `shards` (an iterable of ints) that are not on disk yet.
    Shard i holds `batch_size` rows, each a prompt and the model's continuation. Its prompts
    and sampling are seeded by (seed, i), and it is written atomically, so an interrupted
    run resumes at the first missing shard and reproduces what the whole run would have
    made. Given prompts are taken in one seeded order, row after row and shard after shard,
    so every prompt is answered once before any is answered twice. With `chat`, every
    prompt goes through the tokenizer's chat template (those cut from `tokens` decoded
    first), so an instruct model is distilled on its own answers. temperature 0 is greedy. With
    write=False the shards are computed but not saved (the other ranks of a collective
    run, whose forward passes must match rank 0's).
    """
    from .generate import speculative_generate
    from .text import encode_prompts

    out = Path(out)
    files = []
    shards = list(shards)
    device = model.device
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)) if prompts else None
    for done, shard in enumerate(shards, start=1):
        file = out / f"shard-{shard:05d}.pt"
        files.append(file)
        if file.is_file():  # made before (a resumed or shared run): counts as done
            if progress is not None:
                progress(done, len(shards))
            continue
        if prompts:
            picked = [prompts[order[g % len(prompts)]] for g in range(shard * batch_size, (shard + 1) * batch_size)]
            ids, mask = encode_prompts(tokenizer, picked, chat=chat)
        else:
            cut = torch.Generator().manual_seed(seed * 1_000_003 + shard)
            starts = torch.randint(0, len(tokens) - prompt_length, (batch_size,), generator=cut)
            pieces = [np.asarray(tokens[s : s + prompt_length], dtype=np.int64).tolist() for s in starts.tolist()]
            if chat:
                ids, mask = encode_prompts(tokenizer, [tokenizer.decode(p) for p in pieces], chat=True)
            else:
                ids, mask = torch.tensor(pieces), torch.ones(batch_size, prompt_length, dtype=torch.long)
        # sampling draws on the model's device, so the generator lives there too
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + shard)
        result = speculative_generate(
            model, None, ids.to(device), mask.to(device), max_new_tokens=new_tokens, temperature=temperature,
            top_k=top_k if temperature > 0 else None, generator=generator,
        )
        P = ids.size(1)
        sequences, emitted = result.sequences.cpu(), result.stats.emitted.cpu()
        rows = [
            (ids[r, mask[r].bool()].clone(), sequences[r, P : P + int(emitted[r])].clone())
            for r in range(batch_size)
        ]
        if write:
            atomic_write(file, lambda f: torch.save({"prompts": [p for p, _ in rows], "continuations": [c for _, c in rows]}, f))
        if progress is not None:
            progress(done, len(shards))
    return files


def self_written_prompts(model, tokenizer, n: int, batch_size: int = 16, max_tokens: int = 64, seed: int = 0,
                         temperature: float = 1.0, progress=None, rank: int = 0, world: int = 1,
                         cache: Path | None = None, leads: list[str] | None = None) -> list[list[dict]]:
    """n chat prompts written by the base model itself: it samples from its chat template's
    opening of a user turn alone (text.user_turn_opening), so the requests are of the kind
    it was tuned on, and stage 2 then distils its answers to them. Only requests the model
    ended itself within `max_tokens` are kept, each once: a cut one would teach answers to
    half a question. Batch i is seeded by (seed, i), and the prompts are the first n kept
    in batch order, so a call gives the same prompts again, with any `world`: there rank r
    of an initialised torch.distributed group samples batches r, r + world, ... and the
    ranks share what they kept. With a `cache` folder every batch's requests are kept there
    as they are made, so a call killed midway resumes at the first batch not on disk.
    With `leads`, every request of batch i begins with leads[i % len(leads)] ("In Python,",
    "In SQL,"): the model writes requests on the topics a speculator will serve, still in its
    own words. progress(kept, n) after every round of batches."""
    from .decode import eos_tokens

    opening = user_turn_opening(tokenizer)
    if leads is not None and not (leads and all(isinstance(lead, str) and lead.strip() for lead in leads)):
        raise MLPSpecError(f"leads must be a non-empty list of non-empty strings, got {leads!r}")
    lead_ids = [tokenizer(lead, add_special_tokens=False).input_ids for lead in leads] if leads else [[]]
    device = model.device
    eos = eos_tokens(model, None, device)
    if cache is not None:
        settings = {"opening": opening, "batch_size": batch_size, "max_tokens": max_tokens, "seed": seed,
                    "temperature": temperature}
        _claim_cache(Path(cache), settings | ({"leads": list(leads)} if leads else {}))
    kept, seen = [], set()
    for first in range(0, max(8, 4 * math.ceil(n / batch_size)), world):  # a bounded number of tries
        batch = first + rank
        part = Path(cache) / f"batch-{batch:05d}.json" if cache is not None else None
        if part is not None and part.is_file():
            mine = json.loads(part.read_text())
        else:
            lead = lead_ids[batch % len(lead_ids)]
            ids = torch.tensor([opening + lead] * batch_size, device=device)  # b P
            mine = _finished_requests(model, tokenizer, ids, len(lead), eos, max_tokens, temperature,
                                      torch.Generator(device).manual_seed(seed * 1_000_003 + batch))
            if part is not None:
                atomic_write(part, lambda tmp: Path(tmp).write_text(json.dumps(mine)))
        every = [mine]
        if world > 1:
            every = [None] * world
            torch.distributed.all_gather_object(every, mine)
        for text in (t for requests in every for t in requests):
            if text and text not in seen:
                seen.add(text)
                kept.append([{"role": "user", "content": text}])
        if progress is not None:
            progress(min(len(kept), n), n)
        if len(kept) >= n:
            return kept[:n]
    raise MLPSpecError(
        f"the base model finished only {len(kept)} distinct requests of {n} asked within {max_tokens} tokens; "
        "give a prompt file instead"
    )


def write_self_written_prompts(file: str | Path, model, tokenizer, n: int, write: bool = True, **sampling) -> None:
    """self_written_prompts into the prompt file `file`, keeping each sampled batch in the
    folder FILE.parts until the file is whole, so that a killed call resumes where it
    stopped. Under torchrun every rank samples its share (`sampling` holds rank and world)
    and only the one with `write` writes the file."""
    file = Path(file)
    parts = file.with_name(file.name + ".parts")
    prompts = self_written_prompts(model, tokenizer, n, cache=parts, **sampling)
    if write:
        write_prompt_file(file, prompts)
        shutil.rmtree(parts)


def _finished_requests(model, tokenizer, ids: torch.Tensor, lead: int, eos: torch.Tensor, max_tokens: int,
                       temperature: float, generator: torch.Generator) -> list[str]:
    """One sampled batch of requests after the opening ids [b, P], whose last `lead` tokens
    begin every request: the text of those the model ended itself with one of `eos` (the
    lead and at least one token of its own, and not cut off at max_tokens)."""
    from .generate import speculative_generate

    result = speculative_generate(model, None, ids, torch.ones_like(ids), max_new_tokens=max_tokens,
                                  temperature=temperature, generator=generator)
    finished = []
    P = ids.size(1)
    for r in range(ids.size(0)):
        new = result.sequences[r, P : P + int(result.stats.emitted[r])]
        ended = len(new) >= 2 and bool(torch.isin(new[-1], eos))
        if ended and tokenizer.decode(new[:-1], skip_special_tokens=True).strip():  # words of its own
            # the lead decoded with what follows it, so the text joins as the tokens do
            finished.append(tokenizer.decode(result.sequences[r, P - lead : P + len(new) - 1],
                                             skip_special_tokens=True).strip())
    return finished


def _claim_cache(cache: Path, settings: dict) -> None:
    """A batch cache holds batches of one sampling setting: record it, or refuse another."""
    file = cache / "settings.json"
    if not file.is_file():
        atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps(settings)))
    elif json.loads(file.read_text()) != settings:
        raise MLPSpecError(f"{cache} holds requests sampled with other settings; remove it or sample as before")


def load_generations(files: list[Path]) -> list[torch.Tensor]:
    """Every generated row as one sequence, prompt then continuation."""
    sequences = []
    for file in files:
        shard = torch.load(file, weights_only=True)
        sequences += [torch.cat([p, c]) for p, c in zip(shard["prompts"], shard["continuations"])]
    return sequences


def generated_positions(files: list[Path], length: int) -> torch.Tensor:
    """[rows, length] bool over pad_windows(load_generations(files), length): True where
    the base model wrote the token, False over the prompt and the padding."""
    rows = []
    for file in files:
        shard = torch.load(file, weights_only=True)
        rows += [(len(p), len(p) + len(c)) for p, c in zip(shard["prompts"], shard["continuations"])]
    index = torch.arange(length)
    return torch.stack([(index >= start) & (index < end) for start, end in rows])


def pad_windows(sequences: list[torch.Tensor], length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or cut) sequences to windows [b, length]; valid [b, length] marks real tokens."""
    windows = torch.full((len(sequences), length), pad, dtype=torch.long)
    valid = torch.zeros((len(sequences), length), dtype=torch.bool)
    for r, seq in enumerate(sequences):
        n = min(len(seq), length)
        windows[r, :n] = seq[:n]
        valid[r, :n] = True
    return windows, valid
