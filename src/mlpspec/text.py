"""From prompts as people write them to token batches and back: JSONL prompt files,
chat templates, left padding."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import MLPSpecError
from .fileio import atomic_write

Prompt = str | list[dict]  # plain text, or chat messages [{"role": ..., "content": ...}]


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """One JSON object per line: {"prompt": "..."} or {"messages": [...]}. Blank lines are
    skipped; anything else is an error naming its line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MLPSpecError(f"{path}: cannot read prompt file ({e.__class__.__name__}: {e})") from None
    prompts: list[Prompt] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MLPSpecError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        prompts.append(_prompt_from_row(row, f"{path}:{number}"))
    if not prompts:
        raise MLPSpecError(f"{path}: no prompts in this file")
    return prompts


def write_prompt_file(path: str | Path, prompts: list[Prompt]) -> None:
    """The file read_prompt_file reads back, written whole or not at all."""
    lines = [json.dumps({"prompt": p} if isinstance(p, str) else {"messages": p}) + "\n" for p in prompts]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines)))


def user_turn_opening(tokenizer) -> list[int]:
    """The chat template's tokens before the text of a first user message. An instruct
    model given these alone writes a request itself, of the kind it was tuned to answer
    (Magpie, Xu et al. 2024, arXiv 2406.08464)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise MLPSpecError("this tokenizer has no chat template, so the model cannot write its own chat prompts")
    marker = "MLPSPEC_USER_MESSAGE"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in text:
        raise MLPSpecError("this chat template does not copy the user's message verbatim; give a prompt file instead")
    return tokenizer(text[: text.index(marker)], add_special_tokens=False).input_ids


def _prompt_from_row(row, where: str) -> Prompt:
    if not isinstance(row, dict) or len({"prompt", "messages"} & set(row)) != 1:
        raise MLPSpecError(f'{where}: expected an object with "prompt" or "messages"')
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise MLPSpecError(f'{where}: "prompt" must be a non-empty string')
        return row["prompt"]
    messages = row["messages"]
    if not is_message_list(messages):
        raise MLPSpecError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    return messages


def is_message_list(messages) -> bool:
    """A non-empty list of {"role": str, "content": str} objects, as chat templates take."""
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)
    )


def encode_prompt(tokenizer, prompt: Prompt, chat: bool) -> list[int]:
    """One prompt's token ids. With `chat`, a plain prompt becomes one user message; a
    message list always goes through the tokenizer's chat template, with the generation
    prompt appended."""
    if chat or not isinstance(prompt, str):
        if getattr(tokenizer, "chat_template", None) is None:
            raise MLPSpecError("this tokenizer has no chat template; drop --chat and use plain prompts")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as ids [b, P] and attention mask [b, P], left-padded with `pad`."""
    P = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), P), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, P - len(ids):] = torch.tensor(ids)
        attention_mask[i, P - len(ids):] = 1
    return input_ids, attention_mask


def encode_prompts(tokenizer, prompts: list[Prompt], chat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [b, P] and attention mask [b, P], left-padded (see encode_prompt)."""
    rows = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, chat)
        if not ids:
            raise MLPSpecError(f"prompt {len(rows) + 1} is empty after tokenization")
        rows.append(ids)
    return left_pad(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def decode_new_tokens(tokenizer, sequences: torch.Tensor, prompt_length: int, n_emitted: torch.Tensor) -> list[str]:
    """The text of each row's new tokens (padding after EOS dropped, special tokens too)."""
    return [
        tokenizer.decode(row[prompt_length: prompt_length + int(n)], skip_special_tokens=True)
        for row, n in zip(sequences.tolist(), n_emitted)
    ]
