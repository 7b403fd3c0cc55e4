"""How many tokens the default corpus holds with the default base model's tokenizer, and
what share of them a draft vocabulary of its K most frequent tokens covers.

    .venv/bin/python experiments/corpus_coverage.py --k 8192

The corpus is the standard library's source, plus Debian's python3.11-doc sources where
that package is installed; it is tokenized once and cached as `mlpspec train` caches it.
"""

import argparse
import json

import numpy as np

from mlpspec import load_base
from mlpspec.base import cache_dir
from mlpspec.data import DEBIAN_PYTHON_DOCS, tokenized_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[8192], help="draft vocabulary sizes")
    args = parser.parse_args()
    _, tokenizer = load_base(None)
    tokens = tokenized_corpus(["default"], tokenizer, cache_dir() / "tokens")
    counts = np.sort(np.bincount(tokens, minlength=len(tokenizer)))[::-1]
    print(json.dumps({"python3.11_doc": DEBIAN_PYTHON_DOCS.is_dir(), "tokens": int(tokens.size),
                      "coverage": {k: round(float(counts[:k].sum() / counts.sum()), 4) for k in args.k}}))


if __name__ == "__main__":
    main()
