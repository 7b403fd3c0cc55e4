"""An independent speculator written only from ../shared/REFERENCE.md sections 1 and 2.

It shares no code with mlpspec: its own checkpoint reader and writer, its own stage math
in REFERENCE's (vLLM's) arrangement, ln(proj(s) + (emb_weight / state_weight) * emb(t)),
and a brute-force candidate enumeration. The tests hold mlpspec to it.
"""

import itertools
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class ReferenceSpeculator:
    def __init__(self, config: dict, tensors: dict):
        self.config = config
        h = config["n_predict"]
        self.h = h
        self.m = config["inner_dim"] or config["emb_dim"]
        tied = config.get("tie_weights", False)

        def get(kind, i, suffix="weight"):
            name = f"speculator.{kind}.{i}.{suffix}"
            if name not in tensors and tied:  # shared tensors may be stored once
                name = f"speculator.{kind}.{1 if kind == 'proj' and i >= 1 else 0}.{suffix}"
            return tensors[name].float()

        self.emb = [get("emb", i) for i in range(h)]
        self.proj = [get("proj", i) for i in range(h)]
        self.head = [get("head", i) for i in range(h)]
        self.ln_w = [get("ln", i) for i in range(h)]
        self.ln_b = [get("ln", i, "bias") for i in range(h)]
        self.state_weight = 0.5 ** (0.5 / h)
        self.emb_weight = math.sqrt((1 - self.state_weight**2) * self.m / 2)

    @classmethod
    def load(cls, folder):
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "mlp_speculator"
        return cls(config, load_file(folder / "model.safetensors"))

    def save(self, folder):
        """Write every tensor under every name (the un-deduplicated layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i in range(self.h):
            tensors[f"speculator.emb.{i}.weight"] = self.emb[i].clone()
            tensors[f"speculator.proj.{i}.weight"] = self.proj[i].clone()
            tensors[f"speculator.head.{i}.weight"] = self.head[i].clone()
            tensors[f"speculator.ln.{i}.weight"] = self.ln_w[i].clone()
            tensors[f"speculator.ln.{i}.bias"] = self.ln_b[i].clone()
        save_file(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(self.config))

    @staticmethod
    def norm(x, w=None, b=None):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return y if w is None else y * w + b

    def input_state(self, s):
        return self.norm(s) / math.sqrt(2) if self.config.get("scale_input", False) else s

    def stage(self, i, s, t):
        x = s @ self.proj[i].T + (self.emb_weight / self.state_weight) * self.emb[i][t]
        return torch.nn.functional.gelu(self.norm(x, self.ln_w[i], self.ln_b[i]))

    def forward(self, state, ids):
        n = state.shape[1]
        s = self.input_state(state.float())
        out = []
        for i in range(self.h):
            s = self.stage(i, s, ids[:, i : i + n])
            out.append(s @ self.head[i].T)
        return torch.stack(out)

    def chain(self, state, last_token):
        """The top-1 path, stage by stage: state [d], last_token int -> h token ids."""
        s, t, path = self.input_state(state.float()), int(last_token), []
        for i in range(self.h):
            s = self.stage(i, s, torch.tensor(t))
            t = int((s @ self.head[i].T).argmax())
            path.append(t)
        return path

    def propose(self, state, last_token, top_k, n_candidates):
        """Enumerate every path of the vocabulary^h tree, keep those whose every token is in
        its stage's top-k, rank by summed log-prob. Returns per row a list of (tokens, score)."""
        V = self.head[0].shape[0]
        rows = []
        for b in range(state.shape[0]):
            s0 = self.input_state(state[b, 0].float())
            leaves = []
            for path in itertools.product(range(V), repeat=self.h):
                s, t, score, ok = s0, int(last_token[b, 0]), 0.0, True
                for i, tok in enumerate(path):
                    s = self.stage(i, s, torch.tensor(t))
                    logprobs = torch.log_softmax(s @ self.head[i].T, -1)
                    if (logprobs > logprobs[tok]).sum() >= top_k[i]:
                        ok = False
                        break
                    score += float(logprobs[tok])
                    t = tok
                if ok:
                    leaves.append((list(path), score))
            leaves.sort(key=lambda leaf: -leaf[1])
            rows.append(leaves[:n_candidates])
        return rows
