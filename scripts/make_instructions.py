"""Chat instructions for stage 2, made from the default corpus alone (the standard library's
source and Debian's python3.11-doc), as a JSONL prompt file for `mlpspec train --stage2-prompts`.

    .venv/bin/python scripts/make_instructions.py runs/instructions.jsonl [--count 4096] [--seed 0]

Stage 2 teaches the speculator the base model's own answers, so its prompts should be the
kind of request the speculator will serve. Prompts cut from the corpus are chunks of code
and reST; a chat model asked about them answers differently from one asked a question. These
are questions and small tasks, written from templates over
- the public functions and classes of the standard library, from the first sentence of
  their docstrings ("Return the ..." -> "Write a Python function that returns the ..."),
- the section titles of the Python documentation ("Explain ...", "Give a short example ...").
The files whose tokens make the trainer's held-out tail (the last ones in corpus order) are
left out, and no instruction may equal one of the bench's chat prompts.
"""

import argparse
import ast
import random
import re
from pathlib import Path

from mlpspec.bench import chat_prompts
from mlpspec.data import default_corpus_files
from mlpspec.text import write_prompt_file

# imperative docstring openings, as the third person a task sentence needs
VERBS = {"return": "returns", "convert": "converts", "compute": "computes", "create": "creates",
         "check": "checks", "read": "reads", "write": "writes", "parse": "parses", "format": "formats",
         "find": "finds", "get": "gets", "build": "builds", "remove": "removes", "split": "splits",
         "copy": "copies", "encode": "encodes", "decode": "decodes", "test": "tests", "add": "adds",
         "make": "makes", "open": "opens", "count": "counts", "join": "joins", "load": "loads",
         "generate": "generates", "calculate": "calculates", "determine": "determines", "print": "prints",
         "search": "searches", "sort": "sorts", "translate": "translates", "validate": "validates"}
FUNCTION_TASKS = ["Write a Python function that {task}.", "How would I write a function that {task}?",
                  "Implement a small Python function that {task}, with a docstring."]
NAME_QUESTIONS = ["What does `{name}` do in Python?", "Show how to use `{name}` with a short example.",
                  "Explain `{name}` from the `{module}` module."]
TITLE_QUESTIONS = ["Explain {title} in Python.", "What is {title}? Give a short example.",
                   "Give three tips about {title}.", "Summarize {title} in a few sentences.",
                   "How do I get started with {title} in Python?"]
HELD_OUT_FILES = 0.03  # the last files in corpus order hold the trainer's held-out tail (1% of tokens)


def first_sentence(docstring: str) -> str:
    text = " ".join(docstring.strip().split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s", text)[0].rstrip(".")


def from_source(path: Path, module: str) -> tuple[list[str], list[str]]:
    """Function tasks and questions about names, from one module's public docstrings."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):  # a few test files are deliberately broken
        return [], []
    tasks, questions = [], []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        sentence = first_sentence(doc)
        words = sentence.split()
        name = f"{module}.{node.name}"
        if isinstance(node, ast.FunctionDef) and len(words) >= 4 and words[0].lower() in VERBS and len(sentence) < 120:
            task = " ".join([VERBS[words[0].lower()]] + words[1:])
            tasks.append(random.choice(FUNCTION_TASKS).format(task=task))
        questions.append(random.choice(NAME_QUESTIONS).format(name=name, module=module))
    return tasks, questions


def titles(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    found = []
    for above, line in zip(lines, lines[1:]):
        if len(line) >= 4 and len(set(line)) == 1 and line[0] in "=-~*^" and len(above.strip()) >= 4:
            title = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", above.strip())  # :mod:`os` -> `os`
            title = title.split(" --- ")[-1].strip()
            if 4 <= len(title) <= 70 and not title.startswith(("..", "What's New", "Changelog")):
                found.append(title)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)

    files = default_corpus_files()
    files = files[: int(len(files) * (1 - HELD_OUT_FILES))]
    stdlib_root = min((f for f in files if f.suffix == ".py"), key=lambda f: len(f.parts)).parent
    kinds = {"function tasks": [], "questions about names": [], "questions about topics": []}
    for path in files:
        if path.suffix == ".py" and not {"test", "tests", "idle_test"} & set(path.parts):
            module = ".".join(path.relative_to(stdlib_root).with_suffix("").parts).removesuffix(".__init__")
            tasks, questions = from_source(path, module)
            kinds["function tasks"] += tasks
            kinds["questions about names"] += questions
        elif path.suffix == ".txt":
            kinds["questions about topics"] += [random.choice(TITLE_QUESTIONS).format(title=t) for t in titles(path)]
    held = {p[-1]["content"] if isinstance(p, list) else p for p in chat_prompts()}
    chosen = []
    for kind, found in kinds.items():  # an equal share of each kind, as far as each goes
        found = sorted(set(found) - held)
        random.shuffle(found)
        share = found[: args.count // len(kinds)]
        print(f"{kind}: {len(share)} of {len(found)}")
        chosen += share
    random.shuffle(chosen)
    write_prompt_file(args.out, [[{"role": "user", "content": text}] for text in chosen])
    print(f"{len(chosen)} instructions -> {args.out}")


if __name__ == "__main__":
    main()
