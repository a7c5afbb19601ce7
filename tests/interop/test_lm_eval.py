"""The lm-evaluation-harness plugin: registration, the three request types against the Scorer,
and lm-eval itself (offline, a local task YAML over JSONL items) agreeing with `hybridlm eval run`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import MC_TASK_YAML as TASK_YAML
from conftest import shared_file

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hybridlm.eval.scoring import Scorer, rolling_windows
from hybridlm.eval.tasks import hellaswag, piqa
from hybridlm.eval.tasks.base import EvalOptions
from hybridlm.eval.tasks.multiple_choice import prepare_generic
from hybridlm.interop.lm_eval_plugin import HybridLMEval




FRESH_INTERPRETER_LOOKUP = """
import json, sys
torch_at_start = "torch" in sys.modules
from lm_eval.api.registry import get_model, model_registry
model = get_model("hybridlm")
names = list(model_registry.keys())
print(json.dumps({"torch_at_start": torch_at_start, "names": names, "model": f"{model.__module__}:{model.__name__}"}))
"""


def test_a_fresh_interpreter_finds_the_model_through_the_startup_hook():
    """What `lm_eval --model hybridlm` relies on: the installed .pth registers the model lazily,
    before anything of hybridlm is imported, and lm-eval's own models stay registered."""
    result = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER_LOOKUP], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    assert found["model"] == "hybridlm.interop.lm_eval_plugin:HybridLMEval"
    assert not found["torch_at_start"]
    assert {"hybridlm", "hf", "vllm", "local-completions"} <= set(found["names"])


def test_an_lm_eval_without_the_expected_registry_still_imports(tmp_path):
    """The start-up hook must never break lm-eval: against a layout it does not know (no
    model_registry) `import lm_eval.models` works and a warning says how to register by hand."""
    fake = tmp_path / "lm_eval"
    (fake / "models").mkdir(parents=True)
    (fake / "api").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "api" / "__init__.py").write_text("")
    (fake / "api" / "registry.py").write_text("MODELS = {}\n")
    (fake / "models" / "__init__.py").write_text("LOADED = True\n")
    code = "import lm_eval.models; print(lm_eval.models.LOADED, lm_eval.models.__file__)"
    result = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", str(fake / "models" / "__init__.py")]
    assert "hybridlm could not register the lm-eval model 'hybridlm'" in result.stderr
    assert "import hybridlm.interop.lm_eval_plugin" in result.stderr


REENTRANT_FINDER = """
import importlib.util, json, sys

class AsksImportlibAgain:
    \"\"\"A finder that resolves lm_eval.models by asking importlib, guarding only itself.\"\"\"
    busy = False

    @classmethod
    def find_spec(cls, fullname, path, target=None):
        if fullname != "lm_eval.models" or cls.busy:
            return None
        cls.busy = True
        try:
            return importlib.util.find_spec(fullname)
        finally:
            cls.busy = False

sys.meta_path.insert(1, AsksImportlibAgain)  # after the start-up hook's finder
from lm_eval.api.registry import get_model
model = get_model("hybridlm")
print(json.dumps(f"{model.__module__}:{model.__name__}"))
"""


def test_the_startup_finder_survives_a_finder_that_asks_importlib_again():
    result = subprocess.run([sys.executable, "-c", REENTRANT_FINDER], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == "hybridlm.interop.lm_eval_plugin:HybridLMEval"


def test_the_model_is_registered_and_declared_as_an_entry_point():
    assert get_model("hybridlm") is HybridLMEval
    declared = {ep.name: ep.value for ep in entry_points(group="lm_eval.models")}
    assert declared.get("hybridlm") == "hybridlm.interop.lm_eval_plugin:HybridLMEval"


def test_rolling_windows_equal_lm_evals():
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(100) for _ in range(rng.randrange(0, 40))]
        context = rng.randrange(1, 12)
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, -1, context, 1)]
        assert rolling_windows(ids, -1, context) == [(list(a), list(b)) for a, b in theirs]


def test_hellaswag_preprocess_equals_lm_evals():
    from lm_eval.tasks.hellaswag.utils import preprocess

    items = hellaswag.read_hellaswag(shared_file(hellaswag.FILE))
    for item in items[:500]:
        for text in (item.query, *item.choices):
            assert hellaswag.preprocess(text) == preprocess(text)
    for text in (" A [title] B [step] c  d ", "x [header] y"):
        assert hellaswag.preprocess(text) == preprocess(text)


def test_plugin_requests_go_through_the_scorer(tiny_run):
    plugin = HybridLMEval.create_from_arg_string(f"path={tiny_run},dtype=fp32,batch_size=3",
                                                 {"batch_size": 1, "device": "cpu", "max_batch_size": None})
    scorer = Scorer.from_path(tiny_run, batch_size=2, dtype="fp32")
    assert plugin.scorer.batch_size == 3
    pairs = [("Paragraph 3: the value of x3 is", " 8."), ("", "Paragraph 5")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got, want = plugin.loglikelihood(requests), scorer.loglikelihood(pairs)
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
    text = "".join(f"Paragraph {i}: the value of x{i} is {i * 7 % 13}.\n\n" for i in range(30))
    rolling = plugin.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(scorer.loglikelihood_rolling([text]), abs=1e-3)
    generated = plugin.generate_until([Instance("generate_until", {}, ("Paragraph 4:", {"until": ["\n"],
                                                                                         "max_gen_toks": 10}), 0)])
    assert generated == scorer.generate_until(["Paragraph 4:"], 10, ["\n"]) and "\n" not in generated[0]


def _items(path: Path, n: int) -> None:
    """The first n PIQA items as generic multiple-choice JSON lines, with PIQA's lm-eval prompt."""
    items = piqa.read_piqa(shared_file(piqa.ITEMS), shared_file(piqa.LABELS))[:n]
    path.write_text("".join(json.dumps({"context": i.query, "choices": list(i.choices), "label": i.gold}) + "\n"
                            for i in items))


def test_lm_eval_accuracy_equals_eval_run(tiny_run, tmp_path):
    data, tasks, out = tmp_path / "piqa30.jsonl", tmp_path / "tasks", tmp_path / "out"
    _items(data, 30)
    tasks.mkdir()
    for shots in (0, 2):
        (tasks / f"piqa30_{shots}shot.yaml").write_text(TASK_YAML.format(name=f"piqa30_{shots}shot", data=data,
                                                                           shots=shots))
    script = Path(sys.executable).parent / "lm_eval"  # lm-eval's own command line, no wrapper
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([*command, "--model", "hybridlm", "--model_args", f"path={tiny_run},dtype=fp32",
                             "--tasks", "piqa30_0shot,piqa30_2shot", "--include_path", str(tasks),
                             "--output_path", str(out), "--log_samples"],
                            capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = out.rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]
    for shots in (0, 2):
        ours = subprocess.run([sys.executable, "-m", "hybridlm", "eval", "run", "--model", str(tiny_run), "--tasks",
                               f"mc:{data}", "--shots", str(shots), "--dtype", "fp32", "--json"],
                              capture_output=True, text=True, timeout=600, check=False)
        assert ours.returncode == 0, ours.stderr[-2000:]
        task = json.loads(ours.stdout)["tasks"][f"mc:{data}"]
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert task["metrics"][metric] == pytest.approx(theirs[f"piqa30_{shots}shot"][f"{metric},none"],
                                                            abs=1e-12), (shots, metric)
            assert task["stderr"][metric] == pytest.approx(theirs[f"piqa30_{shots}shot"][f"{metric}_stderr,none"])
    [samples_file] = out.rglob("samples_piqa30_2shot_*.jsonl")
    their_contexts = {s["doc_id"]: s["arguments"]["gen_args_0"]["arg_0"] for s in map(json.loads, samples_file.open())}
    ours = prepare_generic(f"mc:{data}", EvalOptions(shots=2)).contexts
    assert [their_contexts[i] for i in range(len(ours))] == ours  # the same shots, drawn with the same seed


def _lm_eval_cli(model: str, model_args: str, tasks: Path, task: str, out: Path, tmp_path: Path) -> list[dict]:
    """lm-eval's own command line, offline, on a local task; returns its logged samples."""
    script = Path(sys.executable).parent / "lm_eval"  # lm-eval's own command line, no wrapper
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([*command, "--model", model, "--model_args", model_args, "--tasks", task,
                             "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
                            capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    [samples_file] = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in samples_file.open()]


def _requests_and_loglikelihoods(samples: list[dict]) -> tuple[list[tuple[str, str]], list[float]]:
    pairs, scores = [], []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        for i, resp in enumerate(sample["resps"]):
            args = sample["arguments"][f"gen_args_{i}"]
            pairs.append((args["arg_0"], args["arg_1"]))
            scores.append(float(resp[0][0]))
    return pairs, scores


def _mixed_context_items(path: Path) -> None:
    """PIQA items, half of them with the context removed (lm-eval then scores the choices after
    its prefix token alone)."""
    items = piqa.read_piqa(shared_file(piqa.ITEMS), shared_file(piqa.LABELS))[:12]
    path.write_text("".join(json.dumps({"context": "" if n % 2 else i.query, "choices": list(i.choices),
                                        "label": i.gold}) + "\n" for n, i in enumerate(items)))


@pytest.mark.parametrize("fmt", ["remote", "gpt2"])
def test_lm_eval_hf_backend_on_an_export_scores_like_eval_run(fmt, tiny_run, tmp_path):
    """`lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True` and nothing else
    gives the log-likelihoods of `hybridlm eval run`'s Scorer, with and without context: the export
    puts <|eos|> where training did. For the GPT-2 layout, `import hf` of the export scores the same
    again (the round trip keeps the tokens)."""
    from hf_families import make_run

    from hybridlm.config import ModelConfig
    from hybridlm.interop.hf_export import export_hf
    from hybridlm.interop.hf_import import import_hf
    from hybridlm.tokenizer import TextTokenizer

    run = tiny_run
    if fmt == "gpt2":
        vocab = TextTokenizer.load(tiny_run / "tokenizer.json").vocab_size
        cfg = ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, d_model=32, d_ff=48, max_seq_len=1024,
                          layer_pattern="DD", position="learned", norm="layernorm", ffn="gelu", bias=True)
        run = make_run(tmp_path / "gpt2_run", cfg, tiny_run / "tokenizer.json")
    export = tmp_path / "export"
    assert export_hf(run, export, fmt)["format"] == fmt
    data, tasks = tmp_path / "mixed.jsonl", tmp_path / "tasks"
    _mixed_context_items(data)
    tasks.mkdir()
    (tasks / "mixed.yaml").write_text(TASK_YAML.format(name="mixed", data=data, shots=0))
    samples = _lm_eval_cli("hf", f"pretrained={export},trust_remote_code=True", tasks, "mixed", tmp_path / "out",
                           tmp_path)
    pairs, theirs = _requests_and_loglikelihoods(samples)
    assert any(c == "" for c, _ in pairs) and any(c for c, _ in pairs)
    ours = [ll for ll, _ in Scorer.from_path(run, dtype="fp32").loglikelihood(pairs)]
    # fp32 sums of up to ~1,300 nats: the export's own RoPE formula rounds differently from ours
    # (1.2e-4 apart, 1e-7 relative, measured), far below any real mismatch.
    assert theirs == pytest.approx(ours, rel=1e-6, abs=1e-4)
    if fmt == "gpt2":
        import_hf(export, tmp_path / "imported")
        again = [ll for ll, _ in Scorer.from_path(tmp_path / "imported", dtype="fp32").loglikelihood(pairs)]
        assert again == pytest.approx(ours, abs=1e-4)
