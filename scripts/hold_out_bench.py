"""Drop from a prompt file every request that is near one of the bench's chat prompts, so
that a speculator distilled on the answers is not scored on questions it was taught.

    .venv/bin/python scripts/hold_out_bench.py runs/py-prompts.jsonl runs/py-prompts-held.jsonl

A small model asked for programming requests writes the classic ones itself ("how can I
remove duplicates from a list while keeping the order?"), and the bench asks some of those
too. Near means: at least half the words shared (Jaccard over lower-case words) and a
character-level similarity of at least 0.6 (difflib); both were read by eye on the 3072
requests steered with --lead, where they caught the rewordings of 3 of the 12 bench
prompts and a few look-alikes, and nothing else.
"""

import difflib
import re
import sys

from mlpspec.bench import chat_prompts
from mlpspec.text import read_prompt_file, write_prompt_file


def text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)


def words(s: str) -> set[str]:
    return set(re.findall(r"[a-z]+", s.lower()))


def near(a: str, b: str) -> bool:
    shared = len(words(a) & words(b)) / max(len(words(a) | words(b)), 1)
    return shared >= 0.5 and difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio() >= 0.6


source, target = sys.argv[1:3]
bench = [text(p) for p in chat_prompts()]
prompts = read_prompt_file(source)
kept = []
for p in prompts:
    if any(near(text(p), b) for b in bench):
        print("dropped:", text(p)[:100])
    else:
        kept.append(p)
write_prompt_file(target, kept)
print(f"{len(kept)} of {len(prompts)} prompts kept -> {target}")
