"""Shared test helpers and fixtures: the shared data (a skip when absent), tiny data and runs, the chatty serving run."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path


def _share_the_cores() -> None:
    """Under pytest-xdist (scripts/test runs one worker per core) each worker and the subprocesses
    it starts get their share of the cores: without it every worker's PyTorch spins a thread per
    core and the workers slow each other down. (The parity tests take two threads again, to check
    the kernels' partitioning: kernel_threads below.)"""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


_share_the_cores()  # before torch is imported: it reads OMP_NUM_THREADS once

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridlm.config import ModelConfig
from hybridlm.data.prepare import prepare
from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_json
from hybridlm.model import HybridLM
from hybridlm.model.cpu_kernels import kernel_path
from hybridlm.model.decode_kernel_bf16 import linear_applies
from hybridlm.run import load_run, save_final
from hybridlm.tokenizer import train_tokenizer
from hybridlm.train.config import RunConfig, TrainConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KERNEL_TEST_THREADS = 2


@pytest.fixture(autouse=True)
def kernel_threads(request):
    """The parity tests run our kernels on at least two threads, even in an xdist worker given
    one: the kernels split rows, heads and key blocks across threads (and add per-thread partial
    sums), and that partitioning is part of what those tests check."""
    if request.node.path.parent.name != "parity":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, KERNEL_TEST_THREADS))
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now, for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or a skip that says why (CI always has it)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared datasets sit beside the checkout")
    return path


@pytest.fixture(params=["avx512_bf16", "avx2"])
def kernel(request, monkeypatch):
    """Each build of the decode kernels this CPU can run, forced by HYBRIDLM_KERNEL (an AVX-512 CPU
    runs both): their parity tests run on every build."""
    monkeypatch.setenv("HYBRIDLM_KERNEL", request.param)
    try:
        kernel_path()
    except UserError:
        pytest.skip(f"this CPU cannot run the {request.param} kernel path")
    with torch.no_grad():
        if not linear_applies(torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(4, 32, dtype=torch.bfloat16)):
            pytest.skip("the decode kernels need a C++ compiler")


@pytest.fixture
def cli(monkeypatch, capsys):
    """`hybridlm ARGS...` in this process (no interpreter start-up): returns (exit code, stdout, stderr)."""
    from hybridlm.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["hybridlm", *args])
        capsys.readouterr()  # drop what earlier steps printed
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def one_line_error(result, *needles: str) -> None:
    """A refused command: exit 2 and one `error:` line naming every needle, no traceback; `result`
    is a CompletedProcess or the (code, stdout, stderr) of the `cli` fixture."""
    code, stderr = (result[0], result[2]) if isinstance(result, tuple) else (result.returncode, result.stderr)
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


MC_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
fewshot_split: test
num_fewshot: {shots}
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""
"""An lm-eval task over a local JSONL file of {context, choices, label} items (lm-eval's own
multiple-choice scoring; `mc:PATH` in `hybridlm eval run` reads the same file)."""


TINY_MODEL = ['model.preset="tiny"', "model.n_layer=2", "model.d_model=64", "model.window=8", "model.stride=8"]
"""Overrides for a two-layer model that trains in milliseconds per step."""


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A prepared data directory of short numbered paragraphs with its own 300-token tokenizer."""
    root = tmp_path_factory.mktemp("tiny_data")
    text = "".join(f"Paragraph {i}: the value of x{i} is {i * 7 % 13}.\n\n" for i in range(800))
    (root / "in.txt").write_text(text)
    train_tokenizer(text.split("\n\n"), vocab_size=300).save(root / "tokenizer.json")
    prepare([str(root / "in.txt")], root / "tokenizer.json", root / "shards")
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_run(tiny_shards, tmp_path_factory) -> Path:
    """A finished run directory: the two-layer model (one dense, one sparse layer) trained briefly
    on tiny_shards in fp32, for tests that need a real trained hybridlm run."""
    from hybridlm.train.config import load_run_config
    from hybridlm.train.trainer import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    train(load_run_config(None, TINY_MODEL + [
        f"data.path={tiny_shards}", f"train.out={out}", "train.steps=40", "data.batch_size=8", "data.seq_len=64",
        "eval.every=0", "eval.tokens=512", "checkpoint.every=40", "train.dtype=fp32",
        "optim.lr=3e-3", "schedule.warmup_steps=4"]), progress=False)
    return out


CHATTY_CONTEXT = 8192
"""Long enough that one reply at max_tokens keeps a batch slot for seconds on a CPU (a few ms per
token), so a test can hold the slot, fill the queue or leave mid-stream without racing the model."""


@pytest.fixture(scope="session")
def chatty_run(tiny_run, tmp_path_factory) -> Path:
    """A run directory with random weights (tiny_run's tokenizer) whose replies run to max_tokens,
    so requests overlap for long: the logits of the special tokens (eos, <|end|>) are held at 0
    while the others spread around it. Dense + sparse layers with a short window and stride, so
    sparse caches roll; weights pushed off the initial ones and an untied head, so greedy
    replies depend on the context instead of repeating one token."""
    torch.manual_seed(0)
    tokenizer = load_run(tiny_run).tokenizer
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=3, n_head=4, n_kv_head=2,
                      d_model=64, max_seq_len=CHATTY_CONTEXT, layer_pattern="DSS", window=8, stride=5, n_global=2,
                      tie_embeddings=False)
    model = HybridLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.lm_head.weight[list(tokenizer.special_ids.values())] = 0.0
    out = tmp_path_factory.mktemp("chatty") / "chatty"
    out.mkdir()
    atomic_write_json(out / "config.json", RunConfig(model=cfg, train=TrainConfig(out=str(out))).to_dict())
    shutil.copy(tiny_run / "tokenizer.json", out / "tokenizer.json")
    save_final(out, model)
    return out
