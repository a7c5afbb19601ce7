"""The `hybridlm` command: one small typed function per verb, each calling the library.

Contract (DESIGN.md section 4): `--json` prints exactly one JSON document on stdout, progress
goes to stderr; exit 0 on success, 2 on bad input (one line saying what to fix), 1 on failure.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import click

from hybridlm.errors import TrainingStopped, UserError


def _emit(obj: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj, indent=2) if as_json else text)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
registry_option = click.option("--registry", "registry_uri", default=None,
                               help="MLflow registry URI (default: $HYBRIDLM_REGISTRY, else ./hybridlm-registry/registry.db).")
track_option = click.option("--track", is_flag=True, help="Also log the results to the MLflow run that trained the "
                            "model (train.tracking = \"mlflow\").")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hybridlm")
def app() -> None:
    """hybridlm: hybrid-attention language models from raw text to generated text."""


@app.group()
def model() -> None:
    """Inspect model configs."""


@model.command("info")
@click.option("--preset", "preset_name", required=True, help="Preset name (tiny, small, gpt2-124m, paper-7b, paper-30b).")
@click.option("--context", type=int, default=None, help="Context length N (default: the preset's).")
@click.argument("overrides", nargs=-1, metavar="[model.KEY=VALUE]...")
@json_option
def model_info_cmd(preset_name: str, context: int | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Parameters (all and active per token), FLOPs per token, KV cache and training memory of a
    preset, with model fields replaced (e.g. model.ffn="moe" model.n_experts=8)."""
    from hybridlm.model.info import model_info
    from hybridlm.train.config import load_run_config

    if context is not None and context <= 0:
        raise UserError(f"--context must be > 0 (got {context})")
    if stray := [o for o in overrides if not o.startswith("model.")]:
        raise UserError(f"model info takes model.KEY=VALUE overrides only (got {stray[0]!r})")
    cfg = load_run_config(None, [f"model.preset={preset_name!r}", *overrides]).model
    info = {"preset": preset_name, **model_info(cfg, context)}
    _emit(info, as_json, _format_info(info))


def _format_info(info: dict) -> str:
    gib = 1024**3
    return "\n".join([
        f"preset            {info['preset']} ({info['layer_pattern']})",
        f"parameters        {info['params']:,} ({info['params_non_embedding']:,} outside embeddings)",
        f"active per token  {info['params_active']:,} ({info['params_active_non_embedding']:,} outside embeddings)",
        f"FLOPs/token       {info['flops_per_token']:.4g} (all-dense: {info['flops_per_token_dense']:.4g}) at context {info['context']:,}",
        f"KV cache          {info['kv_cache_bytes'] / gib:.3f} GiB (all-dense: {info['kv_cache_bytes_dense'] / gib:.3f} GiB), bf16",
        f"training memory   {info['train_memory_bytes'] / gib:.2f} GiB ({info['train_memory_note']})",
    ])


@app.group()
def tokenizer() -> None:
    """Train tokenizers."""


@tokenizer.command("train")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where to write tokenizer.json.")
@click.option("--kind", type=click.Choice(["bpe", "unigram"]), default="bpe", show_default=True)
@click.option("--vocab-size", type=int, default=8192, show_default=True)
@click.option("--field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--doc-split", type=click.Choice(["paragraph", "line", "file"]), default="paragraph", show_default=True)
@json_option
def tokenizer_train_cmd(sources, out: Path, kind: str, vocab_size: int, field: str, doc_split: str, as_json: bool) -> None:
    """Train a byte-level BPE or Unigram tokenizer on SOURCES (files, dirs, globs, stdlib-docs)."""
    from hybridlm.data.sources import iter_documents, resolve_source
    from hybridlm.tokenizer import train_tokenizer

    resolved = [resolve_source(s, field=field, doc_split=doc_split) for s in sources]
    texts = (doc for src in resolved for doc in iter_documents(src))
    tok = train_tokenizer(texts, kind=kind, vocab_size=vocab_size)
    out = out / "tokenizer.json" if out.is_dir() else out
    tok.save(out)
    _emit({"path": str(out), "vocab_size": tok.vocab_size, "kind": kind}, as_json,
          f"wrote {out} ({kind}, {tok.vocab_size} tokens)")


@app.command("prepare")
@click.argument("sources", nargs=-1, required=True)
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output data directory.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True)
@click.option("--field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--doc-split", type=click.Choice(["paragraph", "line", "file"]), default="paragraph", show_default=True)
@json_option
def prepare_cmd(sources, tokenizer_path: Path, out: Path, val_fraction: float, field: str, doc_split: str,
                as_json: bool) -> None:
    """Tokenize SOURCES into train/validation token shards plus meta.json."""
    from hybridlm.data.prepare import prepare

    meta = prepare(list(sources), tokenizer_path, out, val_fraction=val_fraction, field=field, doc_split=doc_split)
    splits = meta["splits"]
    _emit({"out": str(out), **{s: {k: v[k] for k in ("tokens", "bytes", "docs")} for s, v in splits.items()}},
          as_json, f"wrote {out}: train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens")


@app.command("train", context_settings={"ignore_unknown_options": True})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="TOML config file.")
@click.option("--recipe", "recipe_path", default=None,
              help="Multi-stage recipe: a TOML file, or a built-in one by name (paper-3stage); runs its stages "
                   "in order, resuming where it stopped.")
@click.option("--stage", default=None, help="With --recipe: run (or rerun from scratch) only this stage.")
@click.option("--resume", is_flag=True, help="Continue the run in train.out from its last valid checkpoint.")
@click.option("--nproc-per-node", "nproc", type=int, default=None,
              help="Launch N processes here through torchrun (parallel.strategy = ddp or fsdp).")
@click.option("--help-config", is_flag=True, help="Print every config section and key with its default and meaning.")
@click.argument("overrides", nargs=-1)
@json_option
def train_cmd(config_path: Path | None, recipe_path: str | None, stage: str | None, resume: bool, nproc: int | None,
              help_config: bool, overrides, as_json: bool) -> None:
    """Train a model: hybridlm train --config FILE.toml [section.key=value ...], or --recipe FILE.
    With --nproc-per-node N (or under `torchrun --nproc-per-node N -m hybridlm train ...`) the ranks
    share each batch through DDP or FSDP2."""
    from hybridlm.train.distributed import close_world, init_world

    if help_config:
        from hybridlm.train.config import config_help, format_config_help

        doc = config_help()
        _emit(doc, as_json, format_config_help(doc))
        return

    if recipe_path is not None and config_path is not None:
        raise click.UsageError("give --config or --recipe, not both")
    if recipe_path is None and stage is not None:
        raise click.UsageError("--stage needs --recipe")
    if nproc is not None:
        flags = [*(["--config", str(config_path)] if config_path else []),
                 *(["--recipe", str(recipe_path)] if recipe_path else []), *(["--stage", stage] if stage else []),
                 *(["--resume"] if resume else []), *(["--json"] if as_json else [])]
        _launch(nproc, config_path, recipe_path, flags, list(overrides))
        return
    world = init_world()
    try:
        text, result = _train(config_path, recipe_path, stage, resume, list(overrides))
    finally:
        close_world()
    if world.is_main:
        _emit(result, as_json, text)


def _launch(nproc: int, config_path: Path | None, recipe_path: str | None, flags: list[str],
            overrides: list[str]) -> None:
    """Check the config for N ranks (so bad input stops here, exit 2), then rerun this command
    under torchrun and exit with its status."""
    import subprocess

    from hybridlm.train.config import load_run_config
    from hybridlm.train.distributed import check_world
    from hybridlm.train.recipe import load_recipe

    if nproc < 1 or "WORLD_SIZE" in os.environ:
        raise UserError("--nproc-per-node must be >= 1 and is not for use under torchrun")
    runs = [s.run for s in load_recipe(recipe_path, overrides)] if recipe_path else [load_run_config(config_path, overrides)]
    for run in runs:
        check_world(run, nproc)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "hybridlm", "train", *flags, *overrides]
    sys.exit(subprocess.run(command, check=False).returncode)


def _train(config_path: Path | None, recipe_path: str | None, stage: str | None, resume: bool,
           overrides: list[str]) -> tuple[str, dict]:
    """Run a recipe or one training run; return the summary line and document."""
    if recipe_path is not None:
        from hybridlm.train.recipe import load_recipe, run_recipe

        summaries = run_recipe(load_recipe(recipe_path, overrides), only=stage)
        return "\n".join(
            f"stage {s['stage']}: {s['steps']} steps{' (already done)' if s.get('skipped') else ''} -> "
            f"{s['run_dir']} (val loss {s.get('val_loss', float('nan')):.3f})" for s in summaries), {"stages": summaries}
    from hybridlm.train.config import load_run_config
    from hybridlm.train.trainer import train

    result = train(load_run_config(config_path, overrides), resume=resume)
    return (f"trained {result['steps']} steps -> {result['run_dir']} "
            f"(val bpb {result.get('val_bpb', float('nan')):.3f})"), result


@app.command("generate")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--min-p", type=float, default=0.0, show_default=True,
              help="Drop tokens less likely than MIN_P times the most likely one.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--presence-penalty", type=float, default=0.0, show_default=True,
              help="Subtracted once from the logit of every token the output already holds (-2..2).")
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True,
              help="Subtracted per earlier occurrence in the output (-2..2).")
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Inference precision; auto is bf16 on CPUs with AVX-512 BF16/AMX and on CUDA.")
@json_option
def generate_cmd(model_dir: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                 min_p: float, repetition_penalty: float, presence_penalty: float, frequency_penalty: float,
                 seed: int | None, stop, dtype: str, as_json: bool) -> None:
    """Continue PROMPT with a trained model, streaming text to stdout."""
    from hybridlm.inference.generate import generate_text
    from hybridlm.inference.sampling import SamplingParams
    from hybridlm.run import load_run_on_device

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, seed=seed, stop=tuple(stop))
    run, _ = load_run_on_device(model_dir, dtype)
    pieces = generate_text(run, prompt, params)
    if as_json:
        _emit({"prompt": prompt, "text": "".join(pieces)}, True, "")
        return
    click.echo(prompt, nl=False)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


@app.group("eval")
def eval_group() -> None:
    """Evaluate models."""


@eval_group.command("perplexity")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="A text file, or a prepared data directory (its validation split).")
@click.option("--stride", type=int, default=None, help="Sliding-window stride in tokens (default: the context).")
@json_option
def eval_perplexity_cmd(model_dir: Path, data_path: Path, stride: int | None, as_json: bool) -> None:
    """Loss, perplexity and bits per byte of a model on a text file or a validation split."""
    from hybridlm.eval.perplexity import evaluate_path
    from hybridlm.run import load_run

    result = evaluate_path(load_run(model_dir), data_path, stride)
    _emit(result, as_json, f"loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  bpb {result['bpb']:.4f}  "
                           f"({result['tokens']:,} tokens, {result['bytes']:,} bytes)")


@eval_group.command("run")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--tasks", "task_list", required=True,
              help="Comma-separated task and group names (glue, superglue, race, gsm8k, ...; an unknown name lists "
                   "them all), mc:PATH (JSONL of context/choices/label), gen:PATH (instruction file).")
@click.option("--shots", type=int, default=0, show_default=True, help="Few-shot examples per prompt.")
@click.option("--limit", type=int, default=None, help="Score only the first N items of each task.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Scoring requests per forward.")
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of the few-shot draws.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where the datasets are (default: shared/data beside the checkout).")
@click.option("--stride", type=int, default=None, help="wikitext2 sliding-window stride (default: the context).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Generation tasks' reply length.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Scoring precision; auto is bf16 on CPUs with AVX-512 BF16/AMX and on CUDA.")
@track_option
@json_option
def eval_run_cmd(model_dir: Path, task_list: str, shots: int, limit: int | None, batch_size: int, seed: int,
                 data_dir: Path | None, stride: int | None, max_new_tokens: int, dtype: str, track: bool,
                 as_json: bool) -> None:
    """Benchmark tasks (multiple choice, GLUE, SuperGLUE, reading, reasoning, perplexity,
    generation) the way lm-evaluation-harness scores them."""
    from hybridlm.eval.tasks import format_results, run_tasks, task_names
    from hybridlm.eval.tasks.base import DEFAULT_DATA_DIR, EvalOptions

    if batch_size <= 0:
        raise UserError(f"--batch-size must be > 0 (got {batch_size})")
    options = EvalOptions(data_dir=data_dir or DEFAULT_DATA_DIR, shots=shots, limit=limit, seed=seed, stride=stride,
                          max_new_tokens=max_new_tokens)
    if track:
        _check_tracked(model_dir)
    result = run_tasks(model_dir, task_names(task_list), options, batch_size=batch_size, dtype=dtype,
                       progress=lambda line: click.echo(line, err=True))
    try:
        _track(model_dir, "eval", result, track)
    finally:  # results that took long to compute are printed even when logging them failed
        _emit(result, as_json, format_results(result))


def _check_tracked(model_dir: Path) -> None:
    """Before an evaluation runs: --track needs the MLflow run that trained MODEL_DIR."""
    from hybridlm.train.tracking import tracked_run

    tracked_run(model_dir)


def _track(model_dir: Path, kind: str, result: dict, track: bool) -> None:
    if track:
        from hybridlm.train.tracking import log_evaluation

        result["mlflow_run_id"] = log_evaluation(model_dir, kind, result)


@eval_group.command("efficiency")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--prompt-tokens", type=int, default=None, help="Prompt length N (default: 512, or half a smaller context).")
@click.option("--new-tokens", type=int, default=None, help="Tokens generated M (default: 128, or what fits the context).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per figure (median).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Inference precision; auto is bf16 on CPUs with AVX-512 BF16/AMX and on CUDA.")
@track_option
@json_option
def eval_efficiency_cmd(model_dir: Path, prompt_tokens: int | None, new_tokens: int | None, repeats: int, dtype: str,
                        track: bool, as_json: bool) -> None:
    """The efficiency table: parameters, FLOPs/token, training cost, prefill/decode speed, time to
    first token, peak memory, size on disk and energy per token, each with its unit and method."""
    from hybridlm.eval.efficiency import efficiency_report, format_table

    if track:
        _check_tracked(model_dir)
    result = efficiency_report(model_dir, prompt_tokens=prompt_tokens, new_tokens=new_tokens, dtype=dtype,
                               repeats=repeats)
    try:
        _track(model_dir, "efficiency", result, track)
    finally:
        _emit(result, as_json, format_table(result))


@eval_group.command("report")
@click.argument("results", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@json_option
def eval_report_cmd(results: tuple[Path, ...], out: Path, as_json: bool) -> None:
    """report.md and PNG charts comparing models, from `eval run --json` and `eval efficiency --json` files."""
    from hybridlm.eval.compare import write_eval_report

    result = write_eval_report(list(results), out)
    _emit(result, as_json, f"wrote {', '.join(result['files'].values())} ({len(result['models'])} columns)")


@eval_group.group("human")
def eval_human() -> None:
    """Blind human ratings of two runs' replies: build a study, serve its page, report."""


@eval_human.command("build")
@click.option("--model-a", "model_a", type=click.Path(path_type=Path), required=True, help="Run directory A.")
@click.option("--model-b", "model_b", type=click.Path(path_type=Path), required=True, help="Run directory B.")
@click.option("--prompts", "prompts_spec", required=True,
              help="Instruction file (.json/.jsonl) whose conversations, cut before the last reply, are the prompts.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The study file to create (SQLite).")
@click.option("--mode", type=click.Choice(["pairwise", "rating"]), default="pairwise", show_default=True,
              help="pairwise: which of two replies is better; rating: each reply 1-5.")
@click.option("--limit", type=int, default=None, help="Use only the first N prompts.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the blind shuffle.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True)
@json_option
def eval_human_build_cmd(model_a: Path, model_b: Path, prompts_spec: str, out: Path, mode: str, limit: int | None,
                         max_new_tokens: int, seed: int, dtype: str, as_json: bool) -> None:
    """Both runs reply to the same prompts; the replies become blind cards in OUT."""
    from hybridlm.eval.human.build import build_study

    study = build_study(model_a, model_b, prompts_spec, out, mode=mode, limit=limit, max_new_tokens=max_new_tokens,
                        seed=seed, dtype=dtype)
    cards = len(study.cards())
    _emit({"study": str(study.path), "mode": study.mode, "cards": cards}, as_json,
          f"wrote {study.path}: {cards} {study.mode} cards; rate them with `hybridlm eval human serve {study.path}`")


@eval_human.command("serve")
@click.argument("study_path", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8600, show_default=True)
def eval_human_serve_cmd(study_path: Path, host: str, port: int) -> None:
    """The rating page for a study, until interrupted."""
    from hybridlm.eval.human.store import Study

    study = Study(study_path)
    _need_serve_extra()
    if not 0 < port < 65536:
        raise UserError(f"--port must be 1-65535 (got {port})")
    from hybridlm.eval.human.page import serve_study

    serve_study(study, host, port)


@eval_human.command("report")
@click.argument("study_path", type=click.Path(path_type=Path))
@json_option
def eval_human_report_cmd(study_path: Path, as_json: bool) -> None:
    """Win rates (pairwise) or mean ratings, per criterion, with 95% confidence intervals."""
    from hybridlm.eval.human.report import format_report, report
    from hybridlm.eval.human.store import Study

    document = report(Study(study_path))
    _emit(document, as_json, format_report(document))


@app.group()
def analyze() -> None:
    """Analyses of trained runs."""


@analyze.command("heads")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", "source", default="stdlib-docs", show_default=True,
              help="Text source: a file, a directory, or stdlib-docs[:docstrings|reference|qa].")
@click.option("--tokens", type=int, default=None, help="Tokens of text to analyse (default: 512, or the context).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random tokens for induction scores.")
@click.option("--clusters", type=int, default=4, show_default=True, help="Clusters of heads by Jensen-Shannon distance.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write heads.md, heads.json and PNGs (heatmaps per layer, clusters) here.")
@json_option
def analyze_heads_cmd(run_dir: Path, source: str, tokens: int | None, seed: int, clusters: int, out: Path | None,
                      as_json: bool) -> None:
    """Per layer and head: previous-token, self, first-token (sink) attention, distance, entropy,
    positional offset, induction score, sparse layers' window / strided / global mass, clusters."""
    from hybridlm.analysis.heads import analyze_heads, heads_markdown

    document = analyze_heads(run_dir, source=source, tokens=tokens, seed=seed, clusters=clusters, out=out)
    _emit(document, as_json, heads_markdown(document))


@analyze.command("tokenizer")
@click.argument("sources", nargs=-1, required=True)
@click.option("--vocab-sizes", default="1024,4096", show_default=True, help="Comma-separated vocabulary sizes.")
@click.option("--kinds", default="bpe,unigram", show_default=True, help="Comma-separated: bpe, unigram.")
@click.option("--train", "train_models", is_flag=True,
              help="Also train the same model on each tokenizer (equal steps and length) and score held-out bits/byte.")
@click.option("--preset", default="tiny", show_default=True, help="With --train: the model preset.")
@click.option("--train-steps", type=int, default=100, show_default=True, help="With --train: steps per model.")
@json_option
def analyze_tokenizer_cmd(sources: tuple[str, ...], vocab_sizes: str, kinds: str, train_models: bool, preset: str,
                          train_steps: int, as_json: bool) -> None:
    """BPE vs Unigram at several vocabulary sizes: bytes per token, tokens per word, vocabulary
    used and encode MB/s on held-out documents (and, with --train, bits per byte of a model)."""
    from hybridlm.analysis.tokenizers import compare_tokenizers, format_comparison

    try:
        sizes = [int(v) for v in vocab_sizes.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--vocab-sizes must be comma-separated integers (got {vocab_sizes!r})") from None
    if train_steps <= 0:
        raise UserError(f"--train-steps must be > 0 (got {train_steps})")
    overrides = [f'model.preset="{preset}"', f"train.steps={train_steps}", "data.seq_len=256", "data.batch_size=8",
                 "eval.every=0"] if train_models else None
    document = compare_tokenizers(list(sources), sizes, tuple(k.strip() for k in kinds.split(",") if k.strip()),
                                  train_overrides=overrides)
    _emit(document, as_json, format_comparison(document))


@app.group()
def scaling() -> None:
    """Scaling laws: train a grid of runs, fit laws to them."""


@scaling.command("sweep")
@click.argument("grid_path", type=click.Path(path_type=Path))
@json_option
def scaling_sweep_cmd(grid_path: Path, as_json: bool) -> None:
    """Train every point of a grid (model sizes x token budgets, or an IsoFLOP grid); resumable, and
    several sweeps may share one grid."""
    from hybridlm.analysis.scaling_sweep import run_sweep

    results = run_sweep(grid_path, progress=not as_json)
    _emit({"points": results}, as_json, "\n".join(f"{r['point']:<28} {r['status']}" for r in results))


@scaling.command("fit")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--form", type=click.Choice(["kaplan", "chinchilla"]), default="kaplan", show_default=True,
              help="kaplan: L(N) = (N_c/N)^alpha and E + A/N^alpha; chinchilla: E + A/N^alpha + B/D^beta.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap over runs.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write scaling.json and the plots here.")
@json_option
def scaling_fit_cmd(run_dirs: tuple[Path, ...], form: str, seed: int, out: Path | None, as_json: bool) -> None:
    """Fit a scaling law to finished runs (final validation loss vs parameters, and tokens), with
    bootstrap intervals, for all and for non-embedding parameters."""
    from hybridlm.analysis.scaling_runs import fit_runs, format_fit

    document = fit_runs(list(run_dirs), form, seed=seed, out=out)
    _emit(document, as_json, format_fit(document))


@app.command("report")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output directory (default: RUN/report).")
@json_option
def report_cmd(run: Path, out: Path | None, as_json: bool) -> None:
    """Plots (loss, lr, tokens per source) and report.md for a run directory or a recipe's output."""
    from hybridlm.train.report import format_summary, write_report

    result = write_report(run, out)
    _emit(result, as_json, format_summary(result))


@app.command("quickstart")
@click.option("--preset", "preset_name", type=click.Choice(["tiny", "small"]), default="small", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/quickstart"), show_default=True)
@json_option
def quickstart_cmd(preset_name: str, out: Path, as_json: bool) -> None:
    """Tokenizer -> prepare -> train -> evaluate -> generate on the built-in stdlib-docs corpus."""
    from hybridlm.quickstart import format_summary, run_quickstart

    summary = run_quickstart(preset_name, out, progress=True)
    _emit(summary, as_json, format_summary(summary))


@app.command("quantize")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--to", "kind", type=click.Choice(["int8", "int4"]), required=True,
              help="int8: per-channel weights; int4: group-wise weights (with --group-size).")
@click.option("--group-size", type=int, default=64, show_default=True, help="int4: inputs per scale and zero.")
@click.option("--skip", multiple=True, metavar="GLOB",
              help="Leave matching layers unquantized, e.g. 'blocks.0.*' (repeatable; see --sensitivity).")
@click.option("--out", type=click.Path(path_type=Path), help="The quantized run directory to write.")
@click.option("--data", type=click.Path(path_type=Path),
              help="A text file (e.g. wikitext-2/test.txt): measure perplexity, KL and top-token agreement "
                   "against RUN.")
@click.option("--tokens", type=click.IntRange(min=2), default=16384, show_default=True,
              help="With --data: at most this many tokens of it.")
@click.option("--sensitivity", is_flag=True,
              help="Write nothing: quantize one layer at a time and rank the layers by KL (needs --data).")
@json_option
def quantize_cmd(run: Path, kind: str, group_size: int, skip: tuple[str, ...], out: Path | None, data: Path | None,
                 tokens: int, sensitivity: bool, as_json: bool) -> None:
    """Write a weight-only int8 or int4 copy of RUN that generate, eval, serve and export accept."""
    from hybridlm.model.converters.quant import QuantSpec
    from hybridlm.quantize.report import format_sensitivity, format_summary

    spec = QuantSpec(to=kind, group_size=group_size, skip=list(skip))
    if sensitivity:
        if data is None or out is not None:
            raise UserError("--sensitivity needs --data FILE and writes nothing (drop --out)")
        from hybridlm.quantize.sensitivity import layer_sensitivity

        result = layer_sensitivity(run, spec, data, tokens)
        _emit(result, as_json, format_sensitivity(result))
        return
    if out is None:
        raise UserError("give --out DIR for the quantized run (or --sensitivity to rank layers)")
    from hybridlm.quantize.writer import quantize_run

    result = quantize_run(run, spec, out, data=data, tokens=tokens)
    _emit(result, as_json, format_summary(result))


@app.group("export")
def export_group() -> None:
    """Export runs to other formats."""


@export_group.command("hf")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["auto", "remote", "gpt2"]), default="auto", show_default=True,
              help="gpt2: a plain GPT-2 checkpoint (dense GPT-2-shaped configs only); remote: any config, loaded "
                   "with trust_remote_code=True; auto: gpt2 when the config allows it.")
@json_option
def export_hf_cmd(run: Path, out: Path, fmt: str, as_json: bool) -> None:
    """Write RUN as a Hugging Face transformers checkpoint in the new directory OUT."""
    from hybridlm.interop.hf_export import export_hf, format_summary

    result = export_hf(run, out, fmt)
    _emit(result, as_json, format_summary(result))


@export_group.command("gguf")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--type", "kind", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
              help="The blocks' matrices: f16, or llama.cpp's 8-bit / 4-bit block formats.")
@json_option
def export_gguf_cmd(run: Path, out: Path, kind: str, as_json: bool) -> None:
    """Write RUN (a dense GPT-2-shaped model) as the GGUF file OUT for llama.cpp."""
    from hybridlm.interop.gguf_export import export_gguf

    result = export_gguf(run, out, kind)
    _emit(result, as_json, f"wrote {result['out']} ({result['type']}, {result['bytes'] / 1e6:.2f} MB)")


@app.group("import")
def import_group() -> None:
    """Import models from other formats."""


@import_group.command("hf")
@click.argument("src", metavar="DIR", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@json_option
def import_hf_cmd(src: Path, out: Path, as_json: bool) -> None:
    """Convert the local GPT-2-architecture checkpoint DIR (config.json, weights, tokenizer.json) into
    a dense hybridlm run directory OUT."""
    from hybridlm.interop.hf_import import format_summary, import_hf

    result = import_hf(src, out)
    _emit(result, as_json, format_summary(result))


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{name} takes comma-separated integers (got {text!r})") from None
    if not values or min(values) <= 0:
        raise UserError(f"{name} needs positive integers (got {text!r})")
    return values


def _bench_command(bench: str, default_seq: str, default_pass: str):
    @click.option("--seq", default=default_seq, show_default=True, help="Comma-separated sequence lengths.")
    @click.option("--dtype", default="bf16", show_default=True, help="Comma-separated: bf16, fp32.")
    @click.option("--pass", "passes", default=default_pass, show_default=True, help="Comma-separated passes.")
    @click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per point (median).")
    @click.option("--preset", "preset_name", default=None, help="Model preset (train, generate).")
    @click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
                  help="generate only: weight-only quantized blocks (int4 in groups of 64), both models alike.")
    @json_option
    def command(seq: str, dtype: str, passes: str, repeats: int, preset_name: str | None, quantize: str | None,
                as_json: bool) -> None:
        from hybridlm.bench.runner import compare, format_row

        dtypes = [d for d in dtype.split(",") if d]
        if not dtypes or set(dtypes) - {"bf16", "fp32"}:
            raise UserError(f"--dtype takes bf16 and/or fp32 (got {dtype!r})")
        if repeats <= 0:
            raise UserError(f"--repeats must be > 0 (got {repeats})")
        options = {}
        if preset_name:
            from hybridlm.config import preset

            if bench == "attention":
                raise UserError("bench attention measures one layer and takes no --preset; use bench train or generate")
            preset(preset_name)  # validates the name before any subprocess starts
            options["preset"] = preset_name
        if quantize:
            if bench != "generate":
                raise UserError(f"bench {bench} takes no --quantize (weight-only quantization is for decoding); "
                                "use bench generate --quantize")
            if "bf16" not in dtypes or len(dtypes) > 1:
                raise UserError("--quantize runs with bf16 activations; use --dtype bf16")
            options["quantize"] = quantize
        from hybridlm.model.cpu_kernels import machine

        ran_on = machine()
        if not as_json:
            click.echo(f"{ran_on['cpu']} ({ran_on['cpu_flags']}), kernel path {ran_on['kernel_path']}")
        show = None if as_json else (lambda row: click.echo(format_row(row)))
        results = compare(bench, _int_list(seq, "--seq"), dtypes, [p for p in passes.split(",") if p], repeats,
                          options, progress=show)
        if as_json:
            click.echo(json.dumps({"bench": bench, "machine": ran_on, "results": results}, indent=2))

    command.__doc__ = f"Time hybridlm's sparse and dense paths side by side ({bench})."
    return command


@app.group()
def bench() -> None:
    """Benchmarks: sparse vs dense in the same run, each point in a fresh process."""


bench.command("attention")(_bench_command("attention", "1024,4096,16384", "fwd,fwdbwd"))
bench.command("train")(_bench_command("train", "1024,4096", "train"))
bench.command("generate")(_bench_command("generate", "1024,8192", "decode"))


def _need_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"serving needs the serve extra ({exc.name} is missing): pip install 'hybridlm[serve]'") from None


@app.command("serve", context_settings={"ignore_unknown_options": True})
@click.option("--model", "model_ref", required=True,
              help="Run directory, or models:/NAME@ALIAS to serve a registry alias and follow it (hot swap).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-keys", "keys_file", type=click.Path(path_type=Path), default=None,
              help="File with one API key (or sha256:<hex>) per line; also read: HYBRIDLM_API_KEYS.")
@click.option("--admin-keys", "admin_keys_file", type=click.Path(path_type=Path), default=None,
              help="Keys for POST /admin/reload, in the same form; also read: HYBRIDLM_ADMIN_KEYS.")
@registry_option
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Server TOML ([server], [limits], [safety], [audit], [rollback]).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="Serve LoRA run PATH on the shared base as model NAME (repeatable; server.adapters).")
@click.argument("overrides", nargs=-1)
def serve_cmd(model_ref: str, host: str, port: int, keys_file: Path | None, admin_keys_file: Path | None,
              registry_uri: str | None, config_path: Path | None, adapters: tuple[str, ...], overrides) -> None:
    """OpenAI-compatible HTTP server for a run: /v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics. Overrides: section.key=value (e.g. limits.requests_per_minute=30)."""
    _need_serve_extra()
    from hybridlm.serve.app import serve
    from hybridlm.serve.auth import load_keys
    from hybridlm.serve.config import load_serve_config

    if not 0 <= port < 65536:
        raise UserError(f"--port must be in 0..65535 (got {port})")
    config = load_serve_config(config_path, list(overrides))
    if adapters:
        config = config.with_adapters(_adapter_options(adapters))
    admin = load_keys(admin_keys_file, variable="HYBRIDLM_ADMIN_KEYS")
    serve(_model_source(model_ref, registry_uri), config, load_keys(keys_file), host, port, admin)


def _adapter_options(options: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for option in options:
        name, sep, path = option.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {option!r} must be NAME=PATH (a model name and a LoRA run directory)")
        found[name] = path
    return found


def _model_source(ref: str, registry_uri: str | None):
    """A run directory as it is, or a registry alias the server follows."""
    if ref.startswith("models:"):
        from hybridlm.registry.serving import AliasSource

        return AliasSource.from_uri(ref, registry_uri)
    return Path(ref)


@app.group()
def registry() -> None:
    """The model registry (MLflow): versions of runs, aliases with history, gated promotion, rollback."""


def _registry(uri: str | None):
    from hybridlm.registry.store import Registry

    return Registry(uri)


def _version_doc(version) -> dict:
    return {"name": version.name, "version": version.version, "run_dir": str(version.run_dir),
            "aliases": list(version.aliases), "tags": version.tags}


@registry.command("register")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Model name (letters, digits, '_', '.', '-').")
@click.option("--eval", "evals", multiple=True, type=click.Path(path_type=Path),
              help="`eval run --json` results to put in the model card (repeatable).")
@click.option("--license", "license_id", default="other", show_default=True, help="The model card's license id.")
@registry_option
@json_option
def registry_register_cmd(run: Path, name: str, evals, license_id: str, registry_uri: str | None, as_json: bool) -> None:
    """Register the finished RUN directory as the next version of NAME (it is indexed, not copied)."""
    from hybridlm.fileio import read_json
    from hybridlm.registry.card import render_card
    from hybridlm.registry.store import check_finished

    check_finished(Path(run))
    documents = [read_json(path, "eval results") for path in evals]
    store = _registry(registry_uri)
    versions = store.versions(name) if name in store.names() else []
    card = render_card(run, name, evals=documents, license=license_id, version=str(len(versions) + 1))
    version = store.register(run, name, card)
    _emit(_version_doc(version), as_json, f"registered {version.label} -> {version.run_dir}")


@registry.command("list")
@registry_option
@json_option
def registry_list_cmd(registry_uri: str | None, as_json: bool) -> None:
    """Every model with its versions and aliases."""
    store = _registry(registry_uri)
    models = [{"name": name, "versions": [_version_doc(v) for v in store.versions(name)]} for name in store.names()]
    lines = [f"{m['name']}: " + ", ".join(f"{v['version']}{'@' + '@'.join(v['aliases']) if v['aliases'] else ''}"
                                           for v in m["versions"]) for m in models]
    _emit({"models": models}, as_json, "\n".join(lines) or "the registry is empty")


@registry.command("show")
@click.argument("ref")
@registry_option
@json_option
def registry_show_cmd(ref: str, registry_uri: str | None, as_json: bool) -> None:
    """One version (NAME, NAME@ALIAS or NAME/VERSION): tags, lineage, stages and metrics, model card."""
    from hybridlm.fileio import read_json
    from hybridlm.registry.card import stages

    store = _registry(registry_uri)
    version = store.resolve(ref)
    lineage_path = version.run_dir / "lineage.json"
    doc = {**_version_doc(version), "lineage": read_json(lineage_path, "lineage") if lineage_path.is_file() else None,
           "stages": stages(version.run_dir) if version.run_dir.is_dir() else [], "card": store.card(version)}
    _emit(doc, as_json, doc["card"] or f"{version.label} -> {version.run_dir}")


@registry.group("alias")
def registry_alias() -> None:
    """Point aliases at versions, and read their history."""


@registry_alias.command("set")
@click.argument("name")
@click.argument("alias")
@click.argument("version", type=int)
@registry_option
@json_option
def registry_alias_set_cmd(name: str, alias: str, version: int, registry_uri: str | None, as_json: bool) -> None:
    """Point NAME@ALIAS at VERSION without a gate (recorded in the alias's history)."""
    move = _registry(registry_uri).move(name, alias, version, "set")
    _emit(move.to_dict(), as_json, f"{name}@{alias}: {move.from_version} -> {move.to_version}")


@registry_alias.command("history")
@click.argument("name")
@click.argument("alias")
@registry_option
@json_option
def registry_alias_history_cmd(name: str, alias: str, registry_uri: str | None, as_json: bool) -> None:
    """Every move of NAME@ALIAS: time, who, action, from, to, gate result, reason."""
    moves = [m.to_dict() for m in _registry(registry_uri).history(name, alias)]
    lines = [f"{m['time']}  {m['who']}  {m['action']}  {m['from']} -> {m['to']}"
             f"{'  (' + m['reason'] + ')' if m['reason'] else ''}" for m in moves]
    _emit({"name": name, "alias": alias, "moves": moves}, as_json, "\n".join(lines) or "no moves yet")


@registry.command("promote")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--to", "alias", required=True, help="The alias to move (e.g. production).")
@click.option("--gate", type=click.Path(path_type=Path), default=None, help="Gate TOML of [[check]] tables.")
@registry_option
@json_option
def registry_promote_cmd(name: str, version: int, alias: str, gate: Path | None, registry_uri: str | None,
                         as_json: bool) -> None:
    """Move NAME@ALIAS to VERSION if it passes the gate (hashes always; the gate file's checks)."""
    from hybridlm.registry.promotion import promote

    move, outcomes = promote(_registry(registry_uri), name, version, alias, gate)
    _emit(move.to_dict(), as_json, "\n".join([f"{name}@{alias}: {move.from_version} -> {move.to_version}"] +
                                             [f"  {o['check']}: {o['detail']}" for o in outcomes]))


@registry.command("rollback")
@click.argument("name")
@click.argument("alias")
@click.option("--reason", default="", help="Why (recorded in the alias's history).")
@registry_option
@json_option
def registry_rollback_cmd(name: str, alias: str, reason: str, registry_uri: str | None, as_json: bool) -> None:
    """Move NAME@ALIAS back to the version it pointed at before its current one."""
    from hybridlm.registry.promotion import rollback

    move = rollback(_registry(registry_uri), name, alias, reason=reason)
    _emit(move.to_dict(), as_json, f"{name}@{alias}: {move.from_version} -> {move.to_version} (rolled back)")


@app.group()
def review() -> None:
    """The human review queue of texts the safety filter flagged or blocked."""


db_option = click.option("--db", type=click.Path(path_type=Path), default=Path("review.sqlite"), show_default=True,
                         help="The review database (the server's safety.review_db).")


@review.command("list")
@db_option
@click.option("--status", type=click.Choice(["open", "resolved", "all"]), default="open", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
def review_list_cmd(db: Path, status: str, limit: int, as_json: bool) -> None:
    """Items waiting for review (or resolved, or all), oldest first."""
    from hybridlm.serve.review import ReviewQueue, format_item

    queue = ReviewQueue(db, create=False)
    items = queue.list(None if status == "all" else status, limit)
    text = "\n".join(format_item(i) for i in items) or f"no {'' if status == 'all' else status + ' '}items in {db}"
    _emit({"db": str(db), "counts": queue.counts(), "items": [i.to_dict() for i in items]}, as_json, text)


@review.command("show")
@click.argument("item_id", metavar="ID", type=int)
@db_option
@json_option
def review_show_cmd(item_id: int, db: Path, as_json: bool) -> None:
    """One item in full."""
    from hybridlm.serve.review import ReviewQueue, format_item

    item = ReviewQueue(db, create=False).get(item_id)
    _emit(item.to_dict(), as_json, format_item(item, full=True))


@review.command("resolve")
@click.argument("item_id", metavar="ID", type=int)
@click.option("--decision", type=click.Choice(["allowed", "confirmed"]), required=True,
              help="allowed: the text was fine; confirmed: the filter was right.")
@click.option("--note", default="", help="Why (kept with the item).")
@db_option
@json_option
def review_resolve_cmd(item_id: int, decision: str, note: str, db: Path, as_json: bool) -> None:
    """Close an item with a decision."""
    from hybridlm.serve.review import ReviewQueue, format_item

    item = ReviewQueue(db, create=False).resolve(item_id, decision, note)
    _emit(item.to_dict(), as_json, format_item(item, full=True))


@app.group()
def feedback() -> None:
    """Human preferences the chat page collected (POST /v1/feedback): export them as pairs."""


@feedback.command("export")
@click.option("--db", type=click.Path(path_type=Path), default=Path("feedback.sqlite"), show_default=True,
              help="The server's feedback database (server.feedback_db).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="JSONL of {prompt, chosen, rejected}: a data source for an rm or dpo stage.")
@click.option("--model", "model_name", default=None, help="Only feedback on this model (default: all).")
@json_option
def feedback_export_cmd(db: Path, out: Path, model_name: str | None, as_json: bool) -> None:
    """Write every comparison, and every up-rated reply paired with each down-rated reply to the
    same conversation, as preference pairs."""
    from hybridlm.serve.feedback import export_feedback

    result = export_feedback(db, out, model_name)
    _emit(result, as_json, f"wrote {result['pairs']} pairs to {result['out']} (from {result['comparisons']} "
          f"comparisons and {result['ratings']} ratings)")


@app.group("rm")
def rm_group() -> None:
    """Reward models: score replies."""


@rm_group.command("score")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True, help="A reward-model run.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="JSONL of {prompt, response} or {prompt, chosen, rejected}.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the scored lines here (default: print them on stdout).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True)
@json_option
def rm_score_cmd(model_dir: Path, data_path: Path, out: Path | None, dtype: str, as_json: bool) -> None:
    """Score every reply of a JSONL file with a reward model (adds "reward", or "reward_chosen" and
    "reward_rejected")."""
    from hybridlm.eval.reward_scores import score_file

    result = score_file(model_dir, data_path, out, dtype)
    scored = result.pop("scored")
    if as_json:
        _emit(result, True, "")
        return
    if out is None:
        click.echo(scored, nl=False)
    accuracy = f", pairwise accuracy {result['accuracy']:.3f}" if result["pairs"] else ""
    click.echo(f"scored {result['lines']} lines, mean reward {result['mean']:.4f}{accuracy}", err=out is None)


@app.group()
def lora() -> None:
    """LoRA adapters: fold a LoRA run into a plain one."""


@lora.command("merge")
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The plain run directory to write.")
@json_option
def lora_merge_cmd(run_dir: Path, out: Path, as_json: bool) -> None:
    """Add a LoRA run's adapters into its base weights and write the result as a plain run."""
    from hybridlm.interop.lora_merge import merge_lora_run

    result = merge_lora_run(run_dir, out)
    _emit(result, as_json, f"merged {result['merged_from']} (base {result['base']}) into {result['run_dir']}")


def main() -> None:
    """Entry point: map bad input to exit 2 and failures to exit 1, each with one line."""
    try:
        if os.environ.get("HYBRIDLM_KERNEL", "auto") != "auto":  # a path this CPU cannot run fails before any work
            from hybridlm.model.cpu_kernels import kernel_path

            kernel_path()
        app.main(standalone_mode=False, prog_name="hybridlm")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "hybridlm"
        click.echo(f"error: {exc.format_message()} (see `{command} --help`)", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except UserError as exc:
        _error_line(str(exc))
        sys.exit(2)
    except TrainingStopped as exc:
        _error_line(str(exc))
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if os.environ.get("HYBRIDLM_DEBUG"):
            traceback.print_exc()
        click.echo(f"error: {type(exc).__name__}: {exc} (set HYBRIDLM_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


def _error_line(message: str) -> None:
    """One line on stderr; under torchrun only rank 0 says it (every rank fails the same way)."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"error: {message}", err=True)
