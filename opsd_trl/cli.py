"""``opsd-trl`` command line. Each subcommand is a ``register(subparsers)`` function in ``COMMANDS`` that adds
its parser and sets ``func`` (called with the parsed args; returns an exit code). Heavy imports stay inside
the handlers so ``opsd-trl --help`` is instant."""

from __future__ import annotations

import argparse
import re
import sys


def parse_size(text: str) -> int:
    """'1GB', '64MiB', '500k', '1000' -> bytes (decimal and binary units)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(m.group(2) or " "))


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_size(text: str) -> int:
    """`parse_size`, refusing 0."""
    value = parse_size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def _build_vt_cache(args) -> int:
    import torch

    from opsd_trl.data import ensure_ids, load_any, load_preset, numbered_columns, thinkmorph_vt_columns
    from opsd_trl.vt_cache import build_vt_cache, load_encoder
    from opsd_trl.vt_cache.format import DTYPES, MANIFEST, SKIPPED, read_json

    if (args.dataset is None) == (args.preset is None):
        print("opsd-trl build-vt-cache: give one of --dataset and --preset.", file=sys.stderr)
        return 2
    columns = args.vt_columns
    if args.preset is not None:  # the preset's standard layout, its ids: the training run's with dataset_preset
        dataset = load_preset(args.preset, args.split, args.preset_sources)
    else:
        dataset = load_any(args.dataset, args.split)
    if args.format == "thinkmorph" and args.preset is None:
        dataset = ensure_ids(dataset, args.split)
        columns = columns or thinkmorph_vt_columns(dataset.column_names)
    problem_columns = args.problem_columns
    if problem_columns is None:  # default: the problem-image columns the dataset has
        names = dataset.column_names
        problem_columns = (numbered_columns(names, "problem_image") if args.format == "thinkmorph" and not args.preset
                           else [c for c in ("images",) if c in names])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from opsd_trl.models.loading import parse_image_processor_kwargs

    image_kwargs = parse_image_processor_kwargs(args.image_processor_kwargs)
    encoder = load_encoder(args.model, dtype=DTYPES[args.dtype], device=device, bagel_weights=args.bagel_weights,
                           image_processor_kwargs=image_kwargs)
    out = build_vt_cache(
        dataset,
        encoder,
        args.output,
        vt_columns=columns or ["vt_images"],
        problem_columns=problem_columns,
        id_column=args.id_column,
        batch_size=args.batch_size,
        dtype=args.dtype,
        shard_bytes=args.shard_size,
        skip_bad=args.skip_bad,
        resume=not args.no_resume,
        progress=not args.no_progress,
        source=f"{args.dataset or 'preset ' + args.preset}:{args.split}",
    )
    skipped = read_json(out / MANIFEST, "manifest").get("num_skipped", 0)
    print(f"VT cache ready: {out}" + (f" ({skipped} sample(s) skipped: bad images, listed in {out / SKIPPED})"
                                      if skipped else ""))
    return 0


def _add_build_vt_cache(sub) -> None:
    from opsd_trl.data import DATASET_PRESETS  # no heavy imports

    p = sub.add_parser("build-vt-cache", help="encode visual-thought images once into a VT cache")
    p.add_argument("--model", required=True, help="the policy's folder (Qwen-VL, BAGEL; a BAGEL release folder too)")
    p.add_argument("--bagel-weights", choices=["ema", "model"], default=None,
                   help="BAGEL release folder with ema.safetensors and model.safetensors: which to load")
    p.add_argument("--image-processor-kwargs", default=None,
                   help="JSON settings of the image processor, as the recipe's image_processor_kwargs")
    p.add_argument("--dataset", help="save_to_disk folder, data file, or hub name")
    p.add_argument("--preset", choices=sorted(DATASET_PRESETS), default=None,
                   help="a named data selection instead of --dataset (the recipe's dataset_preset; same sample ids)")
    p.add_argument("--preset-sources", nargs="+", default=None,
                   help="local copies of the preset's sets, in its order (the recipe's dataset_name)")
    p.add_argument("--split", default="train")
    p.add_argument("--format", choices=["standard", "thinkmorph"], default="standard")
    p.add_argument("--vt-columns", nargs="+", help="default: vt_images (standard), reasoning_image_* (thinkmorph)")
    p.add_argument("--problem-columns", nargs="*",
                   help="problem-image columns cached too (the trainer reuses them while the vision tower is frozen); "
                        "default: images (standard), problem_image* (thinkmorph), when present; the flag alone: none")
    p.add_argument("--id-column", default="id")
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples per encoder call")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="tower compute and storage dtype",
    )
    p.add_argument("--shard-size", type=positive_size, default=parse_size("1GiB"), help="e.g. 1GiB, 256MB")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--skip-bad", action="store_true", help="skip samples with unreadable images (see skipped.json)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an interrupted build")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_build_vt_cache)


def _verify_vt_cache(args) -> int:
    from opsd_trl.vt_cache import verify_vt_cache

    problems = verify_vt_cache(args.cache)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{args.cache}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _add_verify_vt_cache(sub) -> None:
    p = sub.add_parser("verify-vt-cache", help="re-check a VT cache's hashes and tensor shapes")
    p.add_argument("cache", help="VT cache directory")
    p.set_defaults(func=_verify_vt_cache)


def _eval_dataset(args):
    """The rows to evaluate: a dataset (`--dataset`), a VLMEvalKit TSV, or generated `--task` samples."""
    from opsd_trl.tasks import load_vlmevalkit_tsv, make_dataset

    if args.dataset:
        from opsd_trl.data import load_any, standardize

        return standardize(load_any(args.dataset, args.split), args.dataset_format, args.split)
    if args.tsv:
        return load_vlmevalkit_tsv(args.tsv)
    if args.task == "maze":
        return make_dataset("maze", args.split, args.n, size=args.size, seed=args.seed,
                            dedupe=args.split != "train", prompt=args.prompt, answer_format=args.answer_format)
    return make_dataset(args.task, args.split, args.n, seed=args.seed, dedupe=args.split != "train")


def _eval(args) -> int:
    import json

    from opsd_trl.eval import evaluate_checkpoints
    from opsd_trl.quickstart import model as quickstart  # model folders, and the quickstart's weights files

    words = {"intro": args.teacher_intro, "transition": args.teacher_transition}
    if any(str(p).endswith(".safetensors") for p in (args.model, args.baseline, args.reference) if p):
        # a quickstart weights file has no folder to save its words in: the quickstart's own, unless given
        words = {"intro": args.teacher_intro or quickstart.TEACHER_INTRO,
                 "transition": args.teacher_transition or quickstart.TEACHER_TRANSITION}
    results = evaluate_checkpoints(args.model, _eval_dataset(args), reference_path=args.reference,
                                   baseline_path=args.baseline, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, predictions_dir=args.predictions_dir,
                                   load=quickstart.load_checkpoint, scorer=args.scorer,
                                   **{k: v for k, v in words.items() if v is not None})
    print(json.dumps(results, indent=1))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, output tokens, latency, teacher-student KL and KL-gap closure")
    p.add_argument("--model", required=True, help="checkpoint to evaluate: a model folder or a quickstart "
                   ".safetensors")
    p.add_argument("--reference", help="fixed reference teacher (the initial policy; it gets the VTs) for the KL")
    p.add_argument("--baseline", help="checkpoint before training: also evaluated, and KL-gap closure reported")
    p.add_argument("--dataset", help="a dataset in the standard layout (save_to_disk folder, .jsonl/.json/.parquet/"
                   ".csv file or hub name; docs/architecture.md) instead of generated samples")
    p.add_argument("--dataset-format", default="standard", choices=["standard", "thinkmorph"])
    p.add_argument("--scorer", help="score every row with this: maze, jigsaw, exact_match, multiple_choice or "
                   "module:function (default: each row's task column)")
    p.add_argument("--tsv", help="VLMEvalKit maze TSV (no VTs: no KL) instead of generated mazes")
    p.add_argument("--task", default="maze", choices=["maze", "jigsaw"], help="generated task (without --dataset)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--n", type=positive_int, default=300, help="generated samples")
    p.add_argument("--size", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="short", help="maze prompt preset (short: the quickstart's vocabulary)")
    p.add_argument("--answer-format", default="numbered", choices=["plain", "numbered", "cells"])
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--predictions-dir", help="write model/baseline.predictions.jsonl here (id, task, meta, "
                   "completion, parsed answer, correct: re-score them with any scorer)")
    p.add_argument("--teacher-intro", help="text before the VTs in the reference teacher's context: the run's "
                   "teacher_intro (default: the words saved with the checkpoint by opsd-trl train; for a quickstart "
                   "weights file ' hint'; else the trainer's)")
    p.add_argument("--teacher-transition", help="text after the VTs: the run's teacher_transition (default: as "
                   "--teacher-intro; the quickstart's is 'answer')")
    p.set_defaults(func=_eval)


def _quickstart(args) -> int:
    from opsd_trl.quickstart import run_quickstart

    if args.levers is not None:
        from pathlib import Path

        import torch

        from opsd_trl.quickstart.levers import leak_table, levers_table, noise_leak, paired_levers_table, run_levers
        from opsd_trl.quickstart.report import replace_section

        torch.set_num_threads(args.threads)
        rows = run_levers(Path(args.out), names=args.levers or None, seeds=args.seeds or 1)
        paired = paired_levers_table(rows)
        table = levers_table(rows) + (f"\n\n{paired}" if paired else "")
        table += "\n\n" + leak_table(noise_leak(Path(args.out)))
        if args.docs:
            replace_section(Path(args.docs), "levers", table)
        print(table)
        return 0
    if args.score_fresh:
        from pathlib import Path

        from opsd_trl.quickstart.levers import plateau_runs
        from opsd_trl.quickstart.pipeline import score_fresh

        seeds = args.seeds or 3
        score_fresh(args.out, seeds=seeds, force=args.force_fresh, threads=args.threads, docs=args.docs,
                    extra_runs=lambda: plateau_runs(Path(args.out), seeds))
        return 0
    if args.tune:
        from pathlib import Path

        import torch

        from opsd_trl.quickstart.report import replace_section
        from opsd_trl.quickstart.tuning import run_tuning

        torch.set_num_threads(args.threads)
        table = run_tuning(Path(args.out), names=args.tune_only, seeds=args.seeds or 1)
        if args.docs:
            replace_section(Path(args.docs), "validation", table)
        print(table)
        return 0
    run_quickstart(args.out, smoke=args.smoke, rebuild_warmstart=args.rebuild_warmstart, threads=args.threads,
                   seeds=args.seeds, docs=args.docs)
    return 0


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="CPU demo: mazes -> tiny VLM -> warm-start -> Visual-OPSD vs noise -> eval")
    p.add_argument("--out", default="quickstart_out", help="output folder; finished stages in it are reused")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage (a test, not a result)")
    p.add_argument("--rebuild-warmstart", action="store_true", help="train the warm-start instead of the shipped one")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seeds", type=int, default=None,
                   help="distillation seeds (default 1; 3 for the docs table); seeds already trained are reused")
    p.add_argument("--docs", default=None, help="also rewrite this page's generated section (docs/quickstart.md)")
    p.add_argument("--tune", action="store_true",
                   help="instead: the validation runs behind the defaults (opsd_trl/quickstart/tuning.py), as a table; "
                   "with --seeds N also each candidate's final accuracy over seeds 0..N-1, its mean and a paired test "
                   "against the default")
    p.add_argument("--tune-only", nargs="+", default=None, metavar="NAME", help="with --tune: these candidates only")
    p.add_argument("--score-fresh", action="store_true",
                   help="instead: score the --out folder's models (--seeds, default 3) and the supervised baseline "
                   "run to its plateau (the lever of that name, trained when missing) on the fresh test split test3, "
                   "once, after the defaults are frozen (docs/quickstart.md)")
    p.add_argument("--force-fresh", action="store_true", help="with --score-fresh: score test3 again (recorded)")
    p.add_argument("--levers", nargs="*", default=None, metavar="NAME",
                   help="instead: the lever experiments on validation (opsd_trl/quickstart/levers.py; all, or the named "
                   "ones) for --seeds seeds, as a table")
    p.set_defaults(func=_quickstart)


def _train(args) -> int:
    from opsd_trl.train import main as train_main

    return train_main(args.argv)


def _add_train(sub) -> None:
    # Everything after `train` goes to TrlParser untouched (`--config`, any `--field value`); a NUL prefix char keeps
    # argparse from reading those options itself.
    p = sub.add_parser("train", help="train from a recipe: --config recipes/X.yaml [--field value ...] "
                       "(same as python -m opsd_trl.train)", prefix_chars="\0", add_help=False)
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=_train)


def _add_sweep(sub) -> None:
    from opsd_trl.sweep import register

    register(sub)


COMMANDS = [_add_build_vt_cache, _add_verify_vt_cache, _add_eval, _add_quickstart, _add_train, _add_sweep]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opsd-trl", description="Visual On-Policy Self-Distillation for TRL")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
