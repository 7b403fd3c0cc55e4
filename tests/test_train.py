import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama, tiny_tokenizer
from mlpspec import MLPSpecError
from mlpspec.cli import main
from mlpspec.train import TrainConfig, lr_at

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A tiny Llama base and a text file with learnable structure (arithmetic runs)."""
    monkeypatch.setenv("MLPSPEC_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        start, stride = rng.randrange(4, 60), rng.choice([1, 3])
        lines.append(" ".join(f"w{(start + stride * i) % 60}" for i in range(40)))
    data = tmp_path / "data.txt"
    data.write_text("\n".join(lines))
    return tmp_path, base, data


def train_args(base, data, out, **overrides):
    options = {
        "base": base, "data": data, "out": out, "seq-len": 24, "batch-size": 4, "n-predict": 3,
        "inner-dim": 32, "stage1-steps": 12, "save-every": 4, "log-every": 2, "lr": 3e-3, "warmup-steps": 2,
        "eval-rows": 4, "eval-new-tokens": 12, "stage2-prompt-length": 6,
    }
    options.update(overrides)
    args = ["train", "--no-progress"]
    for key, value in options.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not None and value is not False:
            args += [f"--{key}", str(value)]
    return args


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def run_cli(args, env=None, **kwargs):
    return subprocess.Popen([str(VENV_BIN / "mlpspec"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_loss_falls_and_accuracy_rises(setup):
    tmp, base, data = setup
    assert main(train_args(base, data, tmp / "run", **{"stage1-steps": 60, "save-every": 60})) == 0
    log = [json.loads(line) for line in (tmp / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e and "eval" not in e]
    first, last = steps[0], steps[-1]
    assert last["loss"] < 0.8 * first["loss"]
    assert min(last["accuracy"]) > max(first["accuracy"]) + 0.15
    assert any("eval" in e for e in log)
    assert (tmp / "run" / "config.json").is_file() and (tmp / "run" / "model.safetensors").is_file()


def test_stage2_and_tied_base_embeddings(setup):
    tmp, base, data = setup
    args = train_args(base, data, tmp / "run", **{"stage1-steps": 6, "stage2-steps": 6, "stage2-rows": 8,
                                                   "generate-batch-size": 4, "stage2-new-tokens": 10,
                                                   "tie-base-embeddings": True, "inner-dim": 0})
    assert main(args) == 0
    log = [json.loads(line) for line in (tmp / "run" / "train_log.jsonl").read_text().splitlines()]
    assert {e["stage"] for e in log} == {1, 2}
    assert sorted(p.name for p in (tmp / "run" / "stage2").iterdir()) == ["shard-00000.pt", "shard-00001.pt"]
    stored = weights(tmp / "run")
    assert not any(name.startswith(("speculator.emb.", "speculator.head.")) for name in stored)
    config = json.loads((tmp / "run" / "config.json").read_text())
    assert config["tie_base_embeddings"] is True


def test_stage2_answers_a_prompt_file(setup):
    tmp, base, data = setup
    asks = ["w1 w2 w3", "w10 w11", "w20 w21 w22 w23"]
    (tmp / "asks.jsonl").write_text("".join(json.dumps({"prompt": a}) + "\n" for a in asks))
    args = train_args(base, data, tmp / "run", **{"stage1-steps": 0, "stage2-steps": 4, "stage2-rows": 6,
                                                   "generate-batch-size": 3, "stage2-new-tokens": 8,
                                                   "stage2-prompts": tmp / "asks.jsonl"})
    assert main(args) == 0
    tok = tiny_tokenizer()
    shards = sorted((tmp / "run" / "stage2").iterdir())
    asked = [tok.decode(p) for f in shards for p in torch.load(f)["prompts"]]
    assert sorted(asked) == sorted(asks * 2)  # each prompt answered twice over the 6 rows, nothing cut from the data
    log = [json.loads(line) for line in (tmp / "run" / "train_log.jsonl").read_text().splitlines()]
    assert {e["stage"] for e in log if "stage" in e} == {2}


def test_stage2_answers_requests_the_base_model_wrote(setup):
    from test_text import CHAT_TEMPLATE

    from mlpspec.text import encode_prompt, read_prompt_file

    tmp, base, data = setup
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    args = train_args(base, data, tmp / "run", **{"stage1-steps": 0, "stage2-steps": 4, "stage2-rows": 6,
                                                   "generate-batch-size": 3, "stage2-new-tokens": 8,
                                                   "stage2-prompts": "self"})
    assert main(args) == 0
    written = read_prompt_file(tmp / "run" / "stage2" / "self-prompts.jsonl")
    assert len({m[0]["content"] for m in written}) == len(written) == 6  # one distinct request per row
    assert not (tmp / "run" / "stage2" / "self-prompts.jsonl.parts").exists()
    asked = [p.tolist() for f in sorted((tmp / "run" / "stage2").glob("shard-*.pt")) for p in torch.load(f)["prompts"]]
    assert sorted(asked) == sorted(encode_prompt(tok, m, chat=True) for m in written)
    # two processes share the sampling and write the same requests
    two = [a if a != str(tmp / "run") else str(tmp / "two") for a in map(str, args)]
    proc = subprocess.run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29519", "-m", "mlpspec",
                           *two], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert read_prompt_file(tmp / "two" / "stage2" / "self-prompts.jsonl") == written


def test_killed_run_resumes_to_the_same_weights(setup):
    tmp, base, data = setup
    common = {"stage1-steps": 24, "save-every": 3}
    assert main(train_args(base, data, tmp / "straight", **common)) == 0

    env = dict(os.environ)
    proc = run_cli(train_args(base, data, tmp / "killed", **common), env=env)
    checkpoints = tmp / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints.is_dir() and any(p.name >= "step-0000009" for p in checkpoints.iterdir())):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp / "killed" / "model.safetensors").exists()  # it really died mid-run

    with pytest.raises(MLPSpecError, match="already holds a training run; pass --resume"):
        from mlpspec.train import train

        train(TrainConfig(**_config(base, data, tmp / "killed", common)))
    assert main(train_args(base, data, tmp / "killed", resume=True, **common)) == 0
    a, b = weights(tmp / "straight"), weights(tmp / "killed")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def _config(base, data, out, overrides):
    args = train_args(base, data, out, **overrides)
    from mlpspec.cli import build_parser
    from dataclasses import fields

    parsed = build_parser().parse_args(args)
    values = {f.name: getattr(parsed, f.name) for f in fields(TrainConfig) if hasattr(parsed, f.name)}
    values["progress"] = False
    return values


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "ddp+fsdp-base"])
def test_two_processes_match_one_with_the_same_global_batch(setup, fsdp):
    tmp, base, data = setup
    assert main(train_args(base, data, tmp / "one", **{"batch-size": 4, "stage1-steps": 6})) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(29517 + fsdp), "-m", "mlpspec",
         *train_args(base, data, tmp / "two", **{"batch-size": 2, "stage1-steps": 6, "fsdp-base": fsdp})],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = weights(tmp / "one"), weights(tmp / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert not torch.equal(a["speculator.proj.0.weight"], weights(tmp / "one" / "checkpoints" / "step-0000004")["speculator.proj.0.weight"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data": "nothing-here.txt"}, "nothing-here.txt: no such file or folder"),
        ({"seq-len": 400}, "exceeds the base model's context of 256"),
        ({"text-field": "body"}, "no field 'body'"),
        ({"stage2-prompts": "no-prompts.jsonl"}, "no-prompts.jsonl: cannot read prompt file"),
        ({"stage2-prompts": "self", "stage2-steps": 2}, "no chat template, so the model cannot write"),
        ({"device": "gpu0"}, "device must be 'auto' or a torch device such as cpu or cuda:0, got 'gpu0'"),
        # 250 one-token words + 8 new tokens > 256, though --stage2-prompt-length 6 would fit
        ({"stage2-prompts": "long.jsonl", "stage2-steps": 2, "stage2-new-tokens": 8},
         "the longest prompt in --stage2-prompts (250 tokens) plus --stage2-new-tokens 8 exceeds"),
    ],
)
def test_bad_input_writes_nothing(setup, capsys, overrides, message):
    tmp, base, data = setup
    overrides = dict(overrides)
    data = overrides.pop("data", data)
    if overrides.get("text-field"):
        data = tmp / "rows.jsonl"
        data.write_text('{"text": "w1 w2"}\n')
    if overrides.get("stage2-prompts") == "long.jsonl":
        overrides["stage2-prompts"] = tmp / "long.jsonl"
        overrides["stage2-prompts"].write_text(json.dumps({"prompt": "w1"}) + "\n" + json.dumps({"prompt": " ".join(["w2"] * 250)}) + "\n")
    assert main(train_args(base, data, tmp / "run", **overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not (tmp / "run").exists()


def test_empty_data_file(setup, capsys):
    tmp, base, _ = setup
    (tmp / "empty.txt").write_text("")
    assert main(train_args(base, tmp / "empty.txt", tmp / "run")) == 2
    assert "no text found" in capsys.readouterr().err
    assert not (tmp / "run").exists()


def test_out_folder_with_another_run(setup, capsys):
    tmp, base, data = setup
    assert main(train_args(base, data, tmp / "run", **{"stage1-steps": 2})) == 0
    capsys.readouterr()
    assert main(train_args(base, data, tmp / "run", **{"stage1-steps": 2, "n-predict": 2, "resume": True})) == 2
    assert "holds a different run (it differs in n_predict)" in capsys.readouterr().err
    assert main(train_args(base, data, tmp / "run", **{"stage1-steps": 2})) == 2
    assert "already holds a training run" in capsys.readouterr().err
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("mine")
    assert main(train_args(base, data, tmp / "other")) == 2
    assert "holds other files" in capsys.readouterr().err


def test_lr_schedule_by_hand():
    cfg = TrainConfig(out="x", lr=1.0, warmup_steps=10, stage1_steps=110, stage2_steps=50)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the stage-1 cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)  # stage 2 starts at 0.1 lr
    assert lr_at(135, cfg) == pytest.approx(0.01 + 0.09 * 0.5)


def test_a_run_may_resume_on_another_device():
    assert TrainConfig(out="x", device="cuda:1").same_run(TrainConfig(out="y", device="cpu"))


def test_unknown_training_config_keys():
    with pytest.raises(MLPSpecError, match="unknown training config keys: bogus"):
        TrainConfig.from_dict({"out": "x", "bogus": 1})


@pytest.mark.parametrize("adapter", [False, True], ids=["tied", "emb-adapter-wider"])
def test_draft_vocabulary_training(setup, adapter):
    tmp, base, data = setup
    width = 48 if adapter else 32  # the adapter lets the speculator be wider than the base embedding
    args = train_args(base, data, tmp / "run", **{"stage1-steps": 40, "save-every": 40, "draft-vocab-size": 24,
                                                   "tie-base-embeddings": True, "tie-weights": True,
                                                   "inner-dim": width if adapter else 0, "emb-adapter": adapter})
    assert main(args) == 0
    stored = weights(tmp / "run")
    draft = stored["speculator.draft_vocab"]
    assert draft.shape == (24,) and torch.equal(draft, draft.sort().values)
    assert stored["speculator.head.0.weight"].shape == (24, width)
    if adapter:  # trained away from its identity start
        assert not torch.equal(stored["speculator.emb_adapter.0.weight"], torch.eye(width, 32))
    log = [json.loads(line) for line in (tmp / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "eval" not in e]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert steps[-1]["accuracy"][0] > steps[0]["accuracy"][0] + 0.1


def test_init_from_a_saved_speculator(setup, capsys):
    tmp, base, data = setup
    assert main(train_args(base, data, tmp / "first", **{"stage1-steps": 4})) == 0
    args = train_args(base, data, tmp / "second", **{"stage1-steps": 4, "lr": 1e-12, "init-from": tmp / "first"})
    assert main(args) == 0  # with a negligible learning rate the weights stay where they started
    a, b = weights(tmp / "first"), weights(tmp / "second")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    capsys.readouterr()
    bad = train_args(base, data, tmp / "third", **{"stage1-steps": 4, "n-predict": 2, "init-from": tmp / "first"})
    assert main(bad) == 2
    assert "differs from this run's in n_predict, top_k_tokens_per_head" in capsys.readouterr().err


def test_feature_layers_start_from_a_plain_speculator_and_learn(setup, capsys):
    tmp, base, data = setup
    assert main(train_args(base, data, tmp / "plain", **{"stage1-steps": 4})) == 0
    args = train_args(base, data, tmp / "layers", **{"stage1-steps": 4, "lr": 1e-12, "init-from": tmp / "plain",
                                                      "feature-layers": "0,1"})
    assert main(args) == 0  # the new maps start at zero: the same speculator, reading more
    plain, layers = weights(tmp / "plain"), weights(tmp / "layers")
    assert set(layers) - set(plain) == {"speculator.feature_maps.0.weight", "speculator.feature_maps.1.weight"}
    for name in plain:
        torch.testing.assert_close(plain[name], layers[name], atol=1e-6, rtol=0)
    assert json.loads((tmp / "layers" / "config.json").read_text())["feature_layers"] == [0, 1]
    assert main(train_args(base, data, tmp / "learn", **{"stage1-steps": 40, "save-every": 40,
                                                         "feature-layers": "1"})) == 0
    log = [json.loads(line) for line in (tmp / "learn" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e and "eval" not in e]
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"]
    assert float(weights(tmp / "learn")["speculator.feature_maps.0.weight"].abs().max()) > 0
    capsys.readouterr()
    bad = train_args(base, data, tmp / "other", **{"stage1-steps": 4, "feature-layers": "0", "init-from": tmp / "learn"})
    assert main(bad) == 2
    assert "differs from this run's in feature_layers" in capsys.readouterr().err
    assert main(train_args(base, data, tmp / "deep", **{"feature-layers": "2"})) == 2
    assert "lie beyond the base model's 2 layers" in capsys.readouterr().err
    assert not (tmp / "deep").exists()


def test_base_targets_are_the_base_models_next_choice():
    """Independently of the index helper: head i's target at position p is what the base
    model picks after reading window[:p + i + 2]."""
    from mlpspec.base import base_outputs
    from mlpspec.tree import greedy_targets

    model = tiny_llama().eval()
    window = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    n, h = 8, 3
    hidden, logits = base_outputs(model, window[:, : n + h])
    targets = greedy_targets(logits.argmax(-1), n, h)  # h b n
    assert hidden.shape == (2, n + h, model.config.hidden_size)
    for i in range(h):
        for p in (0, 3, n - 1):
            expected = model(window[:, : p + i + 2]).logits[:, -1].argmax(-1)  # b
            assert targets[i, :, p].tolist() == expected.tolist()


def test_training_on_the_base_models_own_choices(setup, capsys):
    tmp, base, data = setup
    args = train_args(base, data, tmp / "run", **{"stage1-steps": 40, "save-every": 40, "stage2-steps": 4,
                                                   "stage2-rows": 4, "generate-batch-size": 4,
                                                   "stage2-new-tokens": 10, "targets": "base"})
    assert main(args) == 0
    log = [json.loads(line) for line in (tmp / "run" / "train_log.jsonl").read_text().splitlines()]
    stage1 = [e for e in log if "eval" not in e and e["stage"] == 1]
    assert stage1[-1]["loss"] < 0.8 * stage1[0]["loss"]
    assert {e["stage"] for e in log} == {1, 2}
    assert json.loads((tmp / "run" / "train_config.json").read_text())["targets"] == "base"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(train_args(base, data, tmp / "other", targets="logits"))
    assert "invalid choice: 'logits'" in capsys.readouterr().err
    with pytest.raises(MLPSpecError, match="targets must be one of text, base, distill, got 'logits'"):
        TrainConfig(out="x", targets="logits")


def test_distillation_against_a_one_hot_distribution_is_the_hard_loss():
    """Soft targets that put all their mass on the base's choice give back the hard
    cross-entropy, over a draft vocabulary, with ignored positions left out of both."""
    from mlpspec.model import MLPSpeculator, MLPSpeculatorConfig
    from mlpspec.train import IGNORE_INDEX, SpeculatorObjective

    config = MLPSpeculatorConfig(vocab_size=64, emb_dim=16, inner_dim=16, n_predict=2, draft_vocab_size=32)
    speculator = MLPSpeculator(config)
    speculator.set_draft_vocab(torch.arange(0, 64, 2))
    g = torch.Generator().manual_seed(0)
    hidden, ids = torch.randn(2, 5, 16, generator=g), torch.randint(0, 64, (2, 7), generator=g)
    targets = 2 * torch.randint(0, 32, (2, 2, 5), generator=g)  # h b n, all inside the draft vocabulary
    targets[1, 0, 4] = IGNORE_INDEX
    one_hot = speculator.head_columns(torch.nn.functional.one_hot(targets.clamp(min=0), 64).float() * 1e4)
    objective = SpeculatorObjective(speculator)
    hard, hard_hits = objective(hidden, ids, targets)
    soft, soft_hits = objective(hidden, ids, targets, one_hot)
    torch.testing.assert_close(soft, hard)
    assert torch.equal(soft_hits, hard_hits)
    # a flatter target distribution is a different loss
    flatter, _ = objective(hidden, ids, targets, one_hot / 1e4)
    assert not torch.allclose(flatter, hard)


def test_training_by_distillation(setup):
    tmp, base, data = setup
    args = train_args(base, data, tmp / "run", **{"stage1-steps": 40, "save-every": 40, "targets": "distill",
                                                   "draft-vocab-size": 48})
    assert main(args) == 0
    log = [json.loads(line) for line in (tmp / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "eval" not in e]
    # the loss is a KL divergence, 0 at a perfect match; the tiny random base's choices are
    # near ties, so its top-1 accuracy says little here
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
