"""The llama.cpp backend (llama_cpp.py): the embedded default's GGUF file on llama.cpp,
with the speculator on top, lossless against llama.cpp's own greedy decoding.

Skipped where llama-cpp-python is absent; scripts/test_llama_cpp.sh installs it (a build
of 4-13 minutes) and runs them."""

import pytest
import torch

from mlpspec.base import chosen_backend, default_gguf_file, load_base
from mlpspec.checkpoint import load_speculator
from mlpspec.engine import Engine
from mlpspec.errors import MLPSpecError
from mlpspec.generate import speculative_generate
from mlpspec.sequence import SamplingParams
from mlpspec.tree import build_tree, root_only

from conftest import OracleSpeculator

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: bash scripts/install_llama_cpp.sh")
from mlpspec.llama_cpp import LlamaCppRunner, requantize  # noqa: E402

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nName three uses of a paper clip.<|im_end|>\n<|im_start|>assistant\n",
    "import json\n\n\ndef load_config(path):\n",
]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """The shipped Q4_1 file, and F32 and F16 files of exactly its weights."""
    shipped = default_gguf_file()
    folder = tmp_path_factory.mktemp("gguf")
    files = {"Q4_1": shipped}
    for kind in ("F32", "F16"):
        files[kind] = requantize(shipped, folder / f"smollm2-{kind}.gguf", kind)
    return files


@pytest.fixture(scope="module")
def tokenizer():
    return load_base(backend="llama.cpp")[1]


def exact_runner(path) -> LlamaCppRunner:
    """A runner on `path`; the test is skipped where this build of llama.cpp computes a pass
    of several tokens otherwise than a pass of one (bit for bit only where it does not)."""
    runner = LlamaCppRunner(path)
    if not runner.batch_invariant():
        pytest.skip("this llama.cpp build is not batch invariant (not built by scripts/install_llama_cpp.sh)")
    return runner


def llama_cpp_greedy(path, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's own greedy decoding (llama-cpp-python's Llama, temperature 0)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, verbose=False, n_threads=torch.get_num_threads())
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == n or token == llm.token_eos():
            break
    llm.close()
    return out


@pytest.mark.parametrize("kind", ["Q4_1", "F16", "F32"])
def test_speculative_output_equals_llama_cpp_greedy(gguf_files, tokenizer, kind):
    runner = exact_runner(gguf_files[kind])
    speculator = load_speculator(dtype=torch.float32, base=runner)
    for text in PROMPTS:
        prompt = tokenizer(text)["input_ids"]
        expected = llama_cpp_greedy(gguf_files[kind], prompt, 40)
        out = speculative_generate(runner, speculator, torch.tensor([prompt]), max_new_tokens=40,
                                   eos_token_id=runner.eos_token_id)
        new = out.sequences[0, len(prompt):].tolist()[: len(expected)]
        assert new == expected, f"{kind}: {text!r}"
        assert out.stats.tokens_per_step > 1.3  # the speculator guessed: trees were verified and kept


def test_tree_nodes_match_their_branches_decoded_alone(gguf_files):
    """Every node of a tree verified in one llama_decode (branches as sequences) has the
    logits of its branch decoded alone (up to the order attention sums the cache's cells in:
    a branch's nodes are not next to each other there), and after a path down the second
    branch is kept (decoded again into the cells after the root), the next step's logits are
    exactly those of the whole sequence decoded at once in a fresh context."""
    runner = exact_runner(gguf_files["F32"])
    prompt = [1, 504, 3458, 28, 2914, 30]
    candidates = torch.tensor([[[700, 701, 702], [800, 801, -1], [700, 900, -1]]])  # 1 k D
    engine_cache = runner.row_cache(64, 8, 1)
    joined = runner.prefill(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool), 64, ())
    engine_cache.write_row(0, 0, joined.cache, 0, 0, len(prompt))
    engine_cache.set_rows(1)
    engine_cache.set_length(len(prompt))
    pending = torch.tensor([42])
    tree = build_tree(pending, candidates)
    logits_at, hidden = runner.verify(engine_cache, None, torch.tensor([len(prompt)]), tree, ())
    for k in range(candidates.size(1)):
        branch = [42] + [t for t in candidates[0, k].tolist() if t >= 0]
        alone, _ = runner.hidden_states(prompt + branch)
        for j in range(len(branch)):
            node = 0 if j == 0 else int(tree.node_of[0, k, j - 1])
            got, want = logits_at(torch.tensor([node]))[0], alone[len(prompt) + j]
            assert torch.allclose(got, want, atol=2e-2) and got.argmax() == want.argmax()
    # keep the root, 800 and 801 (candidate 1), then verify one more token after them
    path = torch.tensor([[0, int(tree.node_of[0, 1, 0]), int(tree.node_of[0, 1, 1])]])
    start = engine_cache.length - tree.size
    engine_cache.keep_path(start, start + path, torch.tensor([3]))
    after = root_only(torch.tensor([55]))
    logits_at, _ = runner.verify(engine_cache, None, torch.tensor([len(prompt) + 3]), after, ())
    fresh = LlamaCppRunner(gguf_files["F32"])  # its cells from 0 on, as ours are: attention sums alike
    alone, _ = fresh.hidden_states(prompt + [42, 800, 801, 55])
    assert torch.equal(logits_at(torch.tensor([0]))[0], alone[-1])


def test_batched_rows_equal_each_alone(gguf_files, tokenizer):
    """Requests joining and leaving an engine on llama.cpp (sequences taken, moved and
    freed) decode as each does alone."""
    runner = LlamaCppRunner(gguf_files["F32"])
    speculator = load_speculator(dtype=torch.float32, base=runner)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    lengths = [12, 30, 20]
    alone = []
    for prompt, n in zip(prompts, lengths):
        out = speculative_generate(runner, speculator, torch.tensor([prompt]), max_new_tokens=n)
        alone.append(out.sequences[0, len(prompt):].tolist())
    engine = Engine(runner, speculator, max_batch=2)
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    got = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.id] += out.new_ids
    assert [got[i] for i in ids] == alone


def test_feature_layers_are_transformers_hidden_states(gguf_files):
    """The states after layers 8, 16 and 24, read from llama.cpp's graph, are transformers'
    hidden_states of the same weights."""
    from mlpspec.base import base_outputs

    runner = LlamaCppRunner(gguf_files["F32"])
    model = load_base(dtype=torch.float32, backend="transformers")[0]
    ids = [1, 504, 3458, 28, 2914, 30, 6143, 314]
    _, ours = runner.hidden_states(ids, (8, 16, 24))
    theirs, _ = base_outputs(model, torch.tensor([ids]), feature_layers=(8, 16, 24))
    scale = theirs[0].norm(dim=-1, keepdim=True)
    assert ((ours - theirs[0]).norm(dim=-1, keepdim=True) / scale).max() < 0.02


def test_oracle_trees_through_the_second_child(gguf_files, tokenizer):
    """Trees whose true path runs through child 1 at some stages: the kept path leaves the
    first branch, and the output is still llama.cpp's greedy output."""
    runner = LlamaCppRunner(gguf_files["F32"])
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    expected = llama_cpp_greedy(gguf_files["F32"], prompt, 24)
    sequences = torch.tensor([prompt + expected])
    _, hidden = runner.hidden_states(sequences[0].tolist())
    oracle = OracleSpeculator(runner, sequences, torch.ones(1, len(prompt), dtype=torch.bool), n_predict=3,
                              wrong=lambda p, j: (p + j) % 3 == 1, hidden=hidden.unsqueeze(0))
    out = speculative_generate(runner, oracle, torch.tensor([prompt]), max_new_tokens=24,
                               top_k_tokens_per_head=[2, 2, 2], n_candidates=8)
    assert out.sequences[0, len(prompt):].tolist() == expected
    assert out.stats.tokens_per_step > 2.5


def test_bad_input_gets_one_line(tmp_path, gguf_files):
    from gguf import GGUFWriter

    odd = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(odd), "nonesuch")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MLPSpecError, match="architecture 'nonesuch'"):
        LlamaCppRunner(odd)
    with pytest.raises(MLPSpecError, match="runs a .gguf file"):
        chosen_backend("HuggingFaceTB/SmolLM2-135M-Instruct", "llama.cpp")


def test_the_server_on_llama_cpp(gguf_files, tokenizer):
    """`mlpspec serve --backend llama.cpp`'s app: a request alone on the idle server is
    llama.cpp's own greedy text (the cells start again from the first when the engine is
    idle); staggered concurrent requests all complete (batched rows interleave in the
    unified cache, so only batch 1 is bit for bit); a seeded sampled request answers alike
    twice."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    openai = pytest.importorskip("openai")
    from mlpspec.serve import BackgroundServer, create_app

    runner = LlamaCppRunner(gguf_files["F32"])
    app = create_app(runner, tokenizer, load_speculator(dtype=torch.float32, base=runner), "smol", max_batch=4)
    server = BackgroundServer(app)
    try:
        assert app.state.engine.ready.wait(timeout=120)
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        for text in PROMPTS:
            answer = api.completions.create(model="smol", prompt=text, max_tokens=24, temperature=0)
            expected = llama_cpp_greedy(gguf_files["F32"], tokenizer(text)["input_ids"], 24)
            assert answer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True), text

        def one(i):
            time.sleep(0.05 * i)  # staggered: requests join a batch already decoding
            return api.completions.create(model="smol", prompt=PROMPTS[i % 3], max_tokens=16 + 4 * i, temperature=0)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, range(4)))
        for i, answer in enumerate(answers):
            assert answer.choices[0].finish_reason in ("stop", "length")
            assert 0 < answer.usage.completion_tokens <= 16 + 4 * i
        assert max(answer.usage.model_dump()["batch_size"] for answer in answers) > 1  # they shared steps
        sampled = [api.completions.create(model="smol", prompt=PROMPTS[1], max_tokens=12, temperature=0.8, seed=7)
                   .choices[0].text for _ in range(2)]
        assert sampled[0] == sampled[1]
    finally:
        server.stop()
