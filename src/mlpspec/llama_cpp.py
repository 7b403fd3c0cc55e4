"""The base model on llama.cpp (llama-cpp-python's low-level API): GGUF files on CPUs at
llama.cpp's speed, with the speculator in PyTorch beside it (an optional extra:
scripts/install_llama_cpp.sh builds it for the CPU at hand).

llama.cpp keeps its KV cache in cells that carry a position and a set of sequence ids;
a token attends to the cells of its first sequence at positions up to its own. So a
tree is verified in one `llama_decode`, as llama.cpp's own speculative example does it:
each leaf names a branch, a sequence whose prefix is the row's (`llama_memory_seq_cp`
shares the cells, it copies nothing), and every node carries the branches through it.
Afterwards the row's own sequence takes the accepted path's cells and the branches go.

Each engine row is one sequence; a request that leaves hands its sequence back, and a
row that moves takes its sequence along (nothing is copied). The slot counter and
`valid` mask that the decoder keeps for transformers' cache mean nothing here: this
cache moves its counter as that one does, so the decoder's arithmetic holds unchanged.
"""

from __future__ import annotations

import ctypes
import importlib.util
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import MLPSpecError
from .runner import Prefilled, Runner
from .tree import Tree, at_nodes

# Tokens a llama_decode call takes in one micro-batch: a prompt goes in chunks of this
# many, and a step's nodes over the whole batch must fit in one (the feature layers are
# read from one micro-batch's graph).
UBATCH = 512
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _llama():
    """The llama_cpp module, or a one-line error saying how to get it."""
    if not available():
        raise MLPSpecError("the llama.cpp backend needs llama-cpp-python: run `bash scripts/install_llama_cpp.sh` "
                           "(it builds it for this CPU, about 4-13 minutes)")
    import llama_cpp

    return llama_cpp


class _Tensor(ctypes.Structure):
    """ggml's struct ggml_tensor (ggml.h), as far as its name and data."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


GGML_TYPE_F32 = 0


class _LayerTap:
    """Reads the states after some layers out of llama.cpp's graph while it runs (the
    context's cb_eval): llama.cpp names layer i's output `l_out-i`, which is transformers'
    hidden_states[i + 1]. Asking for a tensor makes the graph stop there, so each tap costs
    a little of every pass."""

    def __init__(self, layers: tuple[int, ...]):
        self.names = {f"l_out-{layer - 1}".encode(): i for i, layer in enumerate(layers)}
        self.states: list[np.ndarray | None] = [None] * len(layers)
        self.callback = _llama().ggml_backend_sched_eval_callback(self._called)

    def _called(self, pointer: int, ask: bool, user_data) -> bool:
        tensor = _Tensor.from_address(pointer)
        index = self.names.get(tensor.name)
        if index is None:
            return False
        if ask:
            return True
        d, n = tensor.ne[0], tensor.ne[1]
        if tensor.type != GGML_TYPE_F32 or tensor.nb[1] != d * 4:
            raise MLPSpecError(f"llama.cpp's {tensor.name.decode()} is not a contiguous float32 tensor")
        values = np.ctypeslib.as_array((ctypes.c_float * (d * n)).from_address(tensor.data))  # n*d, llama.cpp's
        self.states[index] = values.reshape(n, d).copy()  # n d
        return True


class LlamaCppRunner(Runner):
    """A GGUF model on llama.cpp. One engine at a time uses a runner: `row_cache` starts
    its KV cache afresh."""

    def __init__(self, path: str | Path, *, threads: int | None = None, context: int = 4096,
                 flash_attention: bool = False):
        """flash_attention: llama.cpp's fused attention (off by default, as in llama-cpp-python's
        Llama; its sums run in another order, so greedy text may differ from a run without it)."""
        llama = _llama()
        path = Path(path)
        if not path.is_file():
            raise MLPSpecError(f"no GGUF file at {str(path)!r}")
        _silence(llama)
        llama.llama_backend_init()
        params = llama.llama_model_default_params()
        self.model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise MLPSpecError(f"llama.cpp could not load {path.name} (architecture {_architecture(path)!r}): "
                               "it is not a model this build of llama.cpp knows")
        self.path, self.llama = path, llama
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # what it hands the speculator
        self.vocab_size = llama.llama_vocab_n_tokens(self.vocab)
        self.hidden_size = llama.llama_model_n_embd(self.model)
        self.num_layers = llama.llama_model_n_layer(self.model)
        self.context = llama.llama_model_n_ctx_train(self.model) or None
        eos = [t for t in (llama.llama_vocab_eos(self.vocab), llama.llama_vocab_eot(self.vocab)) if t >= 0]
        self.eos_token_id = list(dict.fromkeys(eos))
        pad = llama.llama_vocab_pad(self.vocab)
        self.pad_token_id = pad if pad >= 0 else None
        self.threads = threads or torch.get_num_threads()
        self.flash_attention = flash_attention
        self.feature_layers, self.tap = (), None
        self._embeddings = None  # (embedding, LM head), read from the file when first asked for
        self.ctx, self.cells, self.free = None, 0, []
        self._start(context)
        self._invariant = self._probe_invariance()
        if not self._invariant:
            warnings.warn(f"this llama.cpp build computes a pass of several tokens otherwise than a pass of one on "
                          f"{path.name}: speculation then leaves llama.cpp's own greedy output at near ties; "
                          f"`bash scripts/install_llama_cpp.sh` builds one that does not", stacklevel=2)

    def system_info(self) -> str:
        """llama.cpp's build, as it reports it (its CPU features and kernels)."""
        return self.llama.llama_print_system_info().decode().strip()

    def batch_invariant(self) -> bool:
        """Whether a pass of several tokens computes each of them, bit for bit, as a pass of
        one token does, on this file with this build (probed on load). Only then is a tree's
        verification exactly llama.cpp's own greedy decoding. A stock build is not: its
        llamafile kernels take passes of two or more tokens and ggml's own take one-token
        passes, and the two sum in other orders; scripts/install_llama_cpp.sh builds one
        that is (docs/llama-cpp.md)."""
        return self._invariant

    def _probe_invariance(self) -> bool:
        """In the fresh context: eight tokens in one pass against eight one-token passes."""
        tokens = [(7919 * i) % self.vocab_size for i in range(1, 9)]
        one_pass = self._decode(tokens, list(range(8)), [[0]] * 8, [True] * 8)[0]  # 8 V
        self.clear()
        token_by_token = torch.cat([self._decode([t], [i], [[0]], [True])[0] for i, t in enumerate(tokens)])  # 8 V
        self.clear()
        return torch.equal(one_pass, token_by_token)

    # ---- the llama.cpp context and its sequences

    def _start(self, cells: int) -> None:
        """A fresh context of `cells` KV cells, every sequence free."""
        llama = self.llama
        if self.ctx is not None:
            llama.llama_free(self.ctx)
        params = llama.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = UBATCH
        params.n_seq_max = MAX_SEQUENCES
        params.n_threads = params.n_threads_batch = self.threads
        params.embeddings = True  # the final normed states, beside the logits
        params.pooling_type = llama.LLAMA_POOLING_TYPE_NONE
        params.kv_unified = True  # every sequence in one buffer: a tree's branches share their prefix's cells
        params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attention
                                  else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if self.tap is not None:
            params.cb_eval = self.tap.callback
        self.ctx = llama.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise MLPSpecError(f"llama.cpp could not make a context of {cells} cells")
        self.memory = llama.llama_get_memory(self.ctx)
        self.cells = cells
        self.free = list(range(MAX_SEQUENCES - 1, -1, -1))

    def clear(self) -> None:
        """Every cell and sequence free (the context stays)."""
        self.llama.llama_memory_clear(self.memory, True)
        self.free = list(range(MAX_SEQUENCES - 1, -1, -1))

    def take_sequence(self) -> int:
        if not self.free:
            raise MLPSpecError(f"llama.cpp holds at most {MAX_SEQUENCES} sequences: a smaller batch or tree")
        return self.free.pop()

    def drop_sequence(self, seq: int, start: int = -1) -> None:
        """Forget `seq`'s cells from position `start` on (all: -1); with all, `seq` is free again."""
        self.llama.llama_memory_seq_rm(self.memory, seq, start, -1)
        if start < 0:
            self.free.append(seq)

    def copy_sequence(self, source: int, target: int, start: int = -1, end: int = -1) -> None:
        self.llama.llama_memory_seq_cp(self.memory, source, target, start, end)

    def _decode(self, tokens: list[int], positions: list[int], seqs: list[list[int]], outputs: list[bool]):
        """One llama_decode; returns the outputs' logits [o, V] and states [o, (1+l)d],
        the feature layers' states behind the final ones (every token's, [n, l d], where
        any is asked)."""
        llama, n = self.llama, len(tokens)
        batch = llama.llama_batch_init(n, 0, max(len(s) for s in seqs))
        try:
            batch.n_tokens = n
            for i, (token, position, ids, out) in enumerate(zip(tokens, positions, seqs, outputs)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, len(ids), out
                for k, seq in enumerate(ids):
                    batch.seq_id[i][k] = seq
            status = llama.llama_decode(self.ctx, batch)
        finally:
            llama.llama_batch_free(batch)
        if status != 0:
            raise MLPSpecError(f"llama_decode failed ({status}): " + ("no room left in its KV cache" if status == 1
                                                                       else "see llama.cpp's log"))
        # by batch index (llama_get_logits_ith): the whole buffer (llama_get_logits) holds
        # the outputs in batch order only where every token is one
        kept = [i for i, out in enumerate(outputs) if out]  # o
        logits = torch.from_numpy(np.stack([np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, i),
                                                                  (self.vocab_size,)) for i in kept]))  # o V
        hidden = torch.from_numpy(np.stack([np.ctypeslib.as_array(llama.llama_get_embeddings_ith(self.ctx, i),
                                                                  (self.hidden_size,)) for i in kept]))  # o d
        if self.tap is not None:
            layers = torch.from_numpy(np.concatenate(self.tap.states, axis=1))  # n ld
            hidden = torch.cat([hidden, layers[kept]], dim=1)  # o (1+l)d
        return logits, hidden

    def extend(self, tokens: list[int], positions: list[int], seqs: list[int]) -> None:
        """Put these tokens (each at its position, in its sequence) into the cache, in order."""
        self._decode(tokens, positions, [[seq] for seq in seqs], [False] * (len(tokens) - 1) + [True])

    # ---- the base model's embedding and LM head, for a speculator that shares them

    def get_input_embeddings(self) -> torch.nn.Embedding:
        if self._embeddings is None:
            weights = _read_tensors(self.path, ("token_embd.weight", "output.weight"))
            emb = torch.nn.Embedding.from_pretrained(weights["token_embd.weight"], freeze=True)
            head = torch.nn.Linear(self.hidden_size, self.vocab_size, bias=False)
            head.weight = emb.weight if "output.weight" not in weights else torch.nn.Parameter(
                weights["output.weight"], requires_grad=False)
            self._embeddings = (emb, head)
        return self._embeddings[0]

    def get_output_embeddings(self) -> torch.nn.Linear:
        self.get_input_embeddings()
        return self._embeddings[1]

    def parameters(self):
        """The tensors of this model that live in PyTorch: the embedding and LM head."""
        yield from dict.fromkeys([self.get_input_embeddings().weight, self.get_output_embeddings().weight])

    def hidden_states(self, tokens: list[int], feature_layers: tuple[int, ...] = ()):
        """One sequence's logits [n, V] and states [n, (1+l)d] at every position, as
        transformers' forward gives them (base.base_outputs); the sequence is then forgotten."""
        self._check_layers(tuple(feature_layers))
        if len(tokens) > UBATCH:
            raise MLPSpecError(f"hidden_states reads at most {UBATCH} tokens at once, not {len(tokens)}")
        seq = self.take_sequence()
        try:
            return self._decode(tokens, list(range(len(tokens))), [[seq]] * len(tokens), [True] * len(tokens))
        finally:
            self.drop_sequence(seq)

    # ---- the Runner interface

    def row_cache(self, max_len: int, widest: int, max_rows: int, feature_layers=()) -> LlamaCppCache:
        cells = max_rows * (max_len + widest + 1)
        if self._tap_layers(tuple(feature_layers)) or cells > self.cells:  # a context that reads them, room enough
            self._start(max(cells, self.cells))
        else:  # the same context, emptied
            self.clear()
        return LlamaCppCache(self, max_len + widest + 1, max_rows)

    def prefill(self, ids, prompt_valid, capacity, feature_layers) -> Prefilled:
        self._check_layers(feature_layers)
        cache = LlamaCppCache(self, capacity, ids.size(0))
        logits, hidden = [], []
        for row, valid in zip(ids.tolist(), prompt_valid.tolist()):
            prompt = [t for t, v in zip(row, valid) if v]
            seq = self.take_sequence()
            for start in range(0, len(prompt), UBATCH):
                chunk = prompt[start : start + UBATCH]
                last = start + len(chunk) == len(prompt)
                out = self._decode(chunk, list(range(start, start + len(chunk))), [[seq]] * len(chunk),
                                   [False] * (len(chunk) - 1) + [last])
            logits.append(out[0][-1])
            hidden.append(out[1][-1])
            cache.seqs.append(seq)
            cache.root.append(len(prompt))
        cache.set_rows(len(cache.seqs))
        cache.set_length(ids.size(1))
        return Prefilled(torch.stack(logits), torch.stack(hidden), cache)

    def verify(self, cache, valid, position, tree: Tree, feature_layers):
        self._check_layers(feature_layers)
        b, q = tree.tokens.shape
        tokens, positions, seqs, where = [], [], [], []
        cache.branches, cache.node_seq, cache.node_tokens = [], [], tree.tokens.tolist()
        parent, depth, ancestors = tree.parent.tolist(), tree.depth.tolist(), tree.ancestors.tolist()
        reals = [[v for v in range(q) if v == 0 or parent[r][v] >= 0] for r in range(b)]  # each row's nodes, no padding
        if sum(map(len, reals)) > UBATCH:
            raise MLPSpecError(f"a step of {sum(map(len, reals))} nodes over the batch: the llama.cpp backend takes "
                               f"{UBATCH}")
        for r, real in enumerate(reals):
            has_child = {parent[r][v] for v in real if v}
            leaves = [v for v in real if v not in has_child]
            # The row's own sequence takes the deepest branch (the first of them), whose
            # nodes go first, in the cells right after the root: a path kept down it needs
            # no second pass (keep_path). A lookup branch is the deepest where there is one,
            # and when the policy runs one, its copy is most often what is kept.
            first = max(leaves, key=lambda leaf: depth[r][leaf])
            leaves = [first] + [leaf for leaf in leaves if leaf != first]
            real = [v for v in real if ancestors[r][first][v]] + [v for v in real if not ancestors[r][first][v]]
            own = cache.seqs[r]
            branch = [own] + [self.take_sequence() for _ in leaves[1:]]
            for seq in branch[1:]:
                self.copy_sequence(own, seq)  # the prefix's cells, shared
            node_seq = {}
            for v in real:
                through = [branch[j] for j, leaf in enumerate(leaves) if ancestors[r][leaf][v]]
                node_seq[v] = through[0]
                tokens.append(cache.node_tokens[r][v])
                positions.append(int(position[r]) + depth[r][v])
                seqs.append(through)
                where.append((r, v))
            cache.branches.append(branch[1:])
            cache.node_seq.append(node_seq)
            cache.root[r] = int(position[r])
        logits, hidden = self._decode(tokens, positions, seqs, [True] * len(tokens))  # n V, n (1+l)d
        rows, nodes = torch.tensor(where).T  # n, n
        node_logits = logits.new_zeros(b, q, logits.size(1))  # b q V   padding nodes stay 0: the walk never reads them
        node_logits[rows, nodes] = logits
        node_hidden = hidden.new_zeros(b, q, hidden.size(1))  # b q (1+l)d
        node_hidden[rows, nodes] = hidden
        cache.length += q
        return at_nodes(node_logits), node_hidden

    def describe(self) -> dict:
        text = ctypes.create_string_buffer(256)
        self.llama.llama_model_desc(self.model, text, len(text))
        return {"class": f"llama.cpp ({self.path.name})", "hidden_size": self.hidden_size, "layers": self.num_layers,
                "vocab_size": self.vocab_size, "parameters": self.llama.llama_model_n_params(self.model),
                "dtype": text.value.decode().rsplit(" ", 1)[-1]}

    def identity(self) -> dict:
        stat = self.path.stat()
        return {"backend": "llama.cpp", "file": str(self.path.resolve()), "size": stat.st_size,
                "modified": stat.st_mtime, "threads": self.threads, "machine": platform.machine(),
                "host": platform.node(), "build": self.system_info()}

    def _check_layers(self, feature_layers) -> None:
        """Make the passes read `feature_layers`, in a fresh context where that is new."""
        if tuple(feature_layers) == self.feature_layers:
            return
        if len(self.free) < MAX_SEQUENCES:
            raise MLPSpecError(f"this llama.cpp context reads feature layers {list(self.feature_layers)}, not "
                               f"{list(feature_layers)}, and sequences are in use")
        self._tap_layers(tuple(feature_layers))
        self._start(self.cells)

    def _tap_layers(self, layers: tuple[int, ...]) -> bool:
        """Tap the states after `layers` in contexts started from now on; whether that is new."""
        if layers == self.feature_layers:
            return False
        if any(layer < 1 or layer >= self.num_layers for layer in layers):
            raise MLPSpecError(f"feature layers {list(layers)}: the llama.cpp backend reads layers "
                               f"1..{self.num_layers - 1}")
        self.feature_layers, self.tap = layers, _LayerTap(layers) if layers else None
        return True


class LlamaCppPeer:
    """llama.cpp's own decoding of a GGUF file through llama-cpp-python's Llama, batch 1, for
    the bench to set beside ours: greedy, or with its prompt lookup (LlamaPromptLookupDecoding,
    `lookup` tokens a draft)."""

    def __init__(self, path: str | Path, lookup: int = 0, threads: int | None = None, context: int = 4096):
        llama = _llama()
        _silence(llama)
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.llm = llama.Llama(model_path=str(path), n_ctx=context, verbose=False,
                               n_threads=threads or torch.get_num_threads(),
                               draft_model=LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup else None)

    def stream(self, prompt: list[int], max_new_tokens: int, eos: list[int]) -> Iterator[int]:
        """Up to max_new_tokens greedy tokens after `prompt`, the first of `eos` included,
        each as soon as llama.cpp has it."""
        tokens = self.llm.generate(prompt, temp=0.0, top_k=1, reset=True) if max_new_tokens else ()
        for n, token in enumerate(tokens, 1):
            yield token
            if n == max_new_tokens or token in eos:
                return

    def generate(self, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
        return list(self.stream(prompt, max_new_tokens, eos))


class LlamaCppCache:
    """The engine's cache on llama.cpp (RowCache's interface): each row is a sequence of
    the runner's context. `length` and `capacity` count as TreeCache's do, for the
    decoder's `valid` mask; the cells are llama.cpp's business."""

    static = False
    allocated = True

    def __init__(self, runner: LlamaCppRunner, capacity: int, max_rows: int):
        self.runner, self.capacity, self.max_rows = runner, capacity, max_rows
        self.seqs: list[int] = []  # row -> its sequence
        self.root: list[int] = []  # row -> the position of its last pass's root
        self.branches: list[list[int]] = []  # row -> the sequences its last pass's branches took
        self.node_seq: list[dict[int, int]] = []  # row -> node -> the branch it was verified in
        self.node_tokens: list[list[int]] = []  # row -> node -> its token, in the last pass
        self.length = 0
        self.rows = 0

    @staticmethod
    def pass_width(nodes: int, batch: int) -> int:
        return nodes

    def allocate_like(self, prefilled) -> None:
        pass

    def set_rows(self, rows: int) -> None:
        for seq in self.seqs[rows:]:
            if seq is not None:
                self.runner.drop_sequence(seq)
        del self.seqs[rows:], self.root[rows:]
        self.rows = rows

    def set_length(self, length: int) -> None:
        """The slot counter; at 0 with no rows (the engine is idle), the cells too start
        again from the first, so that a request decodes in the cells, and so with the
        sums, that a lone decoding in a fresh context would use."""
        self.length = length
        if length == 0 and self.rows == 0 and not self.seqs:
            self.runner.clear()

    def write_row(self, row: int, start: int, prefilled: LlamaCppCache, source: int, first: int, count: int) -> None:
        """Row `row` takes prefill row `source`'s sequence (the prefill gives it up)."""
        seq, prefilled.seqs[source] = prefilled.seqs[source], None
        if row < len(self.seqs):
            if self.seqs[row] is not None:
                self.runner.drop_sequence(self.seqs[row])
            self.seqs[row], self.root[row] = seq, prefilled.root[source]
        else:
            self.seqs.append(seq)
            self.root.append(prefilled.root[source])

    def move_row(self, source: int, target: int) -> None:
        """Row `target` takes row `source`'s sequence; `source` is about to go."""
        self.runner.drop_sequence(self.seqs[target])
        self.seqs[target], self.root[target] = self.seqs[source], self.root[source]
        self.seqs[source] = None

    def keep(self, start: int, slots: torch.Tensor) -> None:
        self.length = start + slots.size(1)  # decode.compact: the cells stay where they are

    def keep_path(self, start: int, slots: torch.Tensor, counts: torch.Tensor) -> None:
        """Each row's sequence keeps the cells of its accepted path (root first, counts[r]
        nodes of slots - start); the branches go.

        A path down the first branch (the row's own sequence) sits in the cells right after
        the root, in order, as plain decoding would have put it. A path down another branch
        sits in cells scattered among the others', and attention sums over cells in their
        order in the cache: the sums would round otherwise than plain decoding's, and with
        quantized weights (whose matrix products quantize each activation) a greedy choice
        could tip. So that path's tokens are decoded again into the cells after the root
        (one pass over them; on a batch-invariant build a pass of many tokens computes each
        one as a pass of one does)."""
        path = (slots - start).tolist()
        redo = []  # (sequence, tokens, positions) to decode again in order
        for r, (count, seq) in enumerate(zip(counts.tolist(), self.seqs)):
            root, branch = self.root[r], self.node_seq[r][path[r][count - 1]]
            if branch != seq:
                self.runner.drop_sequence(seq, root + 1)
                redo += [(seq, self.node_tokens[r][node], root + j) for j, node in enumerate(path[r][1:count], 1)]
            else:
                self.runner.drop_sequence(seq, root + count)
        self._drop_branches()
        if redo:
            seqs, tokens, positions = zip(*redo)
            self.runner.extend(list(tokens), list(positions), list(seqs))
        self.length = start + slots.size(1)

    def roll_back(self, start: int) -> None:
        for seq, root in zip(self.seqs, self.root):
            self.runner.drop_sequence(seq, root)
        self._drop_branches()
        self.length = start

    def _drop_branches(self) -> None:
        """Hand back the sequences the last pass's branches took."""
        for branches in self.branches:
            for seq in branches:
                self.runner.drop_sequence(seq)
        self.branches = []


FILE_TYPES = {"F32": 0, "F16": 1, "Q4_1": 3, "Q8_0": 7}  # llama_ftype values


def requantize(source: str | Path, target: str | Path, file_type: str) -> Path:
    """Write `source`'s weights as `file_type` (F32, F16, Q4_1, Q8_0) to `target`, with
    llama.cpp's own quantizer: the F32 of a Q4_1 file holds exactly the weights that
    llama.cpp and transformers read from the Q4_1 one."""
    llama = _llama()
    if file_type not in FILE_TYPES:
        raise MLPSpecError(f"unknown GGUF file type {file_type!r}; choose one of {', '.join(FILE_TYPES)}")
    _silence(llama)
    params = llama.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[file_type]
    params.allow_requantize = True
    params.nthread = torch.get_num_threads()
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    if llama.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise MLPSpecError(f"llama.cpp could not write {source} as {file_type}")
    tmp.replace(target)
    return target


def _read_tensors(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Those of `names` that the GGUF file holds, dequantized to float32 [rows, columns]."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    found = {}
    for tensor in GGUFReader(path).tensors:
        if tensor.name in names:
            columns, rows = (int(n) for n in tensor.shape[:2])  # GGUF lists the fastest-moving dimension first
            values = dequantize(tensor.data, tensor.tensor_type).reshape(rows, columns)
            found[tensor.name] = torch.from_numpy(values.astype(np.float32))
    return found


def _architecture(path: Path) -> str:
    """The architecture a GGUF file names (general.architecture), read with the gguf package."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (ImportError, KeyError, ValueError, OSError):
        return "unknown"


_QUIET = []  # the log callback, kept alive while llama.cpp may call it


def _silence(llama) -> None:
    """Silence llama.cpp's log: its errors come back as return values, which become ours."""
    if not _QUIET:
        _QUIET.append(llama.llama_log_callback(lambda level, text, user_data: None))
        llama.llama_log_set(_QUIET[0], ctypes.c_void_p(0))
