"""``flowrl`` command line: ``train``, ``sample``, ``eval``, ``gallery``, ``serve-rewards``, ``pretrain-digits``."""

from __future__ import annotations

import argparse
import sys
from typing import Any
from pathlib import Path


def _load_config(args: argparse.Namespace):
    from flowrl.config import TrainConfig

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    return cfg.override(args.set) if args.set else cfg


def _train(args: argparse.Namespace) -> int:
    import os

    from flowrl.algorithms import format_overrides, preset_overrides
    from flowrl.trainer import train

    cfg = _load_config(args)
    if args.allow_config_change:
        cfg = cfg.override(["train.allow_config_change=true"])
    set_num_threads(cfg)
    table = format_overrides(preset_overrides(cfg))
    # what this config changes of its method, before anything loads; once under a launcher (the
    # process group does not exist yet: RANK is what torchrun / accelerate launch set)
    if table and os.environ.get("RANK", "0") == "0":
        print(table, flush=True)
    result = train(cfg)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # several processes: one report
        return 0
    last = result.history[-1] if result.history else {}
    print(f"run directory: {result.run_dir}")
    if last:
        print(final_line(last))
    if (result.run_dir / "config.yaml").is_file():
        print(f"look at it: flowrl gallery {result.run_dir} --out gallery   (then open gallery/index.html)")
    if result.breakdown:
        print(result.breakdown)
    if result.summary:
        print(result.summary)  # last: the one line scripts read
    return 0


def final_line(last: dict) -> str:
    """The last iteration's reward, and its KL to the reference only when one was measured (β > 0)."""
    text = f"final train reward {last.get('reward/mean', float('nan')):.4f}"
    if "kl/ref" in last:
        text += f", kl {last['kl/ref']:.3e}"
    else:
        text += " (no KL term: loss.beta = 0)"
    return text


def _config_show(args: argparse.Namespace) -> int:
    """Print the resolved config (what a run records in config.yaml) and the override table, after
    every check a run makes before loading anything; runs nothing."""
    from flowrl.algorithms import format_overrides, preset_overrides
    from flowrl.checkpointing import resolved_yaml
    from flowrl.rules import check_compatibility

    cfg = _load_config(args)
    resolved = cfg.resolved()
    check_compatibility(resolved)
    print(resolved_yaml(cfg, resolved), end="")
    table = format_overrides(preset_overrides(cfg))
    print(f"# {table.replace(chr(10), chr(10) + '# ')}" if table else f"# no setting differs from preset {cfg.algorithm}")
    print("# checks passed: this config can start (model, prompts and reward files are read when it runs)")
    return 0


#: built-in models small enough that one CPU thread is the fastest setting on a shared machine
TINY_PIPELINES = ("digits", "tiny-sd3", "tiny-flux", "tiny-wan", "tiny-hunyuan-video", "tiny-qwen-image", "tiny-llama", "tiny-amused")


def set_num_threads(cfg) -> int | None:
    """torch's CPU threads for this command: ``train.num_threads`` when set; else, for the embedded
    tiny models on the CPU, 1 unless ``OMP_NUM_THREADS`` says otherwise (many threads on a tiny model
    mostly wait on each other: see docs/performance.md); else torch's default. Returns what it set."""
    import os

    import torch

    n = getattr(cfg.train, "num_threads", None)
    if n is None and cfg.model.pipeline in TINY_PIPELINES and cfg.model.device in ("cpu", "auto") and not torch.cuda.is_available():
        n = None if os.environ.get("OMP_NUM_THREADS") else 1
    if n is not None:
        torch.set_num_threads(int(n))
    return n


def _pretrain_digits(args: argparse.Namespace) -> int:
    from flowrl import pretrain_digits

    return pretrain_digits.main(args.rest) or 0


def _run_and_weights(args: argparse.Namespace):
    """The run (``--run``, the run a ``--lora`` / ``--checkpoint`` folder belongs to, or a bare
    ``--config``), the config to evaluate with (eval settings overridden by ``--prompt``,
    ``--seed``, ``--samples-per-prompt``, ``--set``) and the weights asked for (``--base``,
    ``--lora``, ``--checkpoint``; default: the run's evaluated weights, or the config's model)."""
    from flowrl import runs
    from flowrl.config import ConfigError, TrainConfig

    lora = _single(getattr(args, "lora", None), "--lora")
    ckpt = _single(getattr(args, "checkpoint", None), "--checkpoint")
    if sum(bool(x) for x in (lora, ckpt, getattr(args, "base", False))) > 1:
        raise ConfigError("give at most one of --base, --lora and --checkpoint.")
    run_dir = getattr(args, "run", None)
    if run_dir is None and not args.config:  # a run's own lora/ or checkpoint names its run
        for p, up in ((lora, 1), (ckpt, 2)):
            if p and (Path(p).parents[up - 1] / "config.yaml").is_file():
                run_dir = Path(p).parents[up - 1]
    if run_dir is not None:
        run = runs.load_run(run_dir)
        if args.config:
            run.config = TrainConfig.from_yaml(args.config)
    else:
        run = runs.Run.from_config(TrainConfig.from_yaml(args.config) if args.config else TrainConfig())
    cfg = run.config.override(args.set) if args.set else run.config
    prompts = list(args.prompt) if args.prompt else None
    prompt_file = getattr(args, "prompts", None)
    if prompt_file:
        if prompts:
            raise ConfigError("give either --prompt (repeatable) or --prompts FILE, not both.")
        if not Path(prompt_file).exists():
            raise ConfigError(f"--prompts {prompt_file}: no such file (a .txt/.jsonl/.json/.csv/.parquet prompt file).")
        prompts = str(Path(prompt_file).resolve())
    if prompts is None and cfg.train.eval_prompts is None:  # no held-out set: the training prompts
        cfg = runs.with_eval_overrides(cfg, prompts=cfg.train.prompts)
    cfg = runs.with_eval_overrides(cfg, prompts=prompts, seed=args.seed, samples_per_prompt=args.samples_per_prompt)
    if lora:
        weights = run.lora_weights(lora)
    elif ckpt:
        weights = run.checkpoint_weights(ckpt)
    elif getattr(args, "base", False) or run.dir is None:
        weights = run.base_weights()
    else:
        weights = run.evaluated_weights()
    return run, cfg, weights


def _single(value, flag: str):
    if isinstance(value, list):
        if len(value) > 1:
            from flowrl.errors import ConfigError

            raise ConfigError(f"{flag} is given {len(value)} times; this command takes one.")
        return value[0] if value else None
    return value


def _sample(args: argparse.Namespace) -> int:
    from flowrl import gallery, runs

    run, cfg, weights = _run_and_weights(args)
    set_num_threads(cfg)
    outputs, prompts = runs.generate(run, weights, config=cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{weights.title} · seed {cfg.train.seed}"
    if not hasattr(outputs, "dim"):  # language models: text, as Markdown (samples.png → samples.md)
        out = out.with_suffix(".md") if out.suffix.lower() in (".png", ".jpg", ".webp") else out
        out.write_text("".join(f"### {p}\n{o}\n\n" for p, o in zip(prompts, outputs)), encoding="utf-8")
    elif outputs.dim() == 5:  # video [B, F, C, H, W]: one file per sample (+ poster) and a grid of posters
        from flowrl import media

        folder = out.with_suffix("")
        written = [media.save_video(v, folder / f"{i:04d}", fps=args.fps, format=args.video_format)["video"] for i, v in enumerate(outputs)]
        gallery.save_labeled_grid(outputs[:, 0], out, captions=prompts, title=title)
        print(f"wrote {len(prompts)} videos of {weights.title} to {folder}/ ({written[0].suffix[1:]}, with .poster.png frames) and their posters to {out}")
        return 0
    else:
        gallery.save_labeled_grid(outputs, out, captions=prompts, title=title)
    print(f"wrote {len(prompts)} samples of {weights.title} to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from flowrl import runs

    run, cfg, weights = _run_and_weights(args)
    set_num_threads(cfg)
    bench = None
    if args.benchmark:
        from flowrl.benchmarks import check_benchmark

        bench = check_benchmark(args.benchmark, list(cfg.reward.rewards))
    result = runs.evaluate(run, weights, config=cfg)
    report = runs.eval_report(result, run=run, category=args.category)
    if bench is not None:
        report["benchmark"] = {"name": args.benchmark, "column": bench.column, "table": bench.table(result, bench.column)}
    same_settings = cfg.train.eval_prompts == run.config.train.eval_prompts and runs.Run(cfg).eval_settings == run.eval_settings
    reported = run.reported(weights) if same_settings else None
    if reported:
        report["run_reported"] = {k: v for k, v in reported.items() if k in report["aggregate"]}
    out = Path(args.out) if args.out else (run.dir / "eval.json" if run.dir is not None else Path("eval.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(runs.format_report(report, reported))
    if bench is not None:
        print("\n" + report["benchmark"]["table"])
    print(f"wrote {out}")
    return 0


def _gallery(args: argparse.Namespace) -> int:
    from flowrl import gallery

    path = gallery.build_gallery(
        args.runs, args.out, config=args.config, overrides=args.set, loras=args.lora or [], checkpoints=args.checkpoint or [],
        intermediate=args.checkpoints, prompts=args.prompt, seed=args.seed, samples_per_prompt=args.samples_per_prompt,
        max_prompts=args.max_prompts,
    )
    print(f"gallery: {path}")
    return 0


def load_server_config(path: str) -> Any:
    """The :class:`~flowrl.config.RewardConfig` of a rewards YAML: a training config's ``reward``
    section (``{reward: {...}}``) or that section alone (``{rewards: {pickscore: 1.0}, device:
    cuda:1}`` or the shorthand ``{pickscore: 1.0}``). Relative weight paths are taken from the
    file's folder, as in a training config."""
    from pathlib import Path

    from flowrl.config import ConfigError, TrainConfig, load_yaml, resolve_relative_paths

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"rewards file {p} does not exist; check the --config path.")
    data = load_yaml(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a rewards file is a mapping (e.g. `rewards: {{pickscore: 1.0}}`), got {type(data).__name__}.")
    try:
        cfg = TrainConfig.from_dict({"reward": data.get("reward", data)})
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return resolve_relative_paths(cfg, p.parent).reward


def build_server(path: str, *, host: str = "127.0.0.1", port: int = 18090, device: str | None = None) -> Any:
    """The server of a rewards YAML (:func:`load_server_config`); ``device`` overrides its ``device``."""
    import torch

    from flowrl.rewards import build_rewards
    from flowrl.rewards.serving import RewardServer

    rc = load_server_config(path)
    defaults = {}
    dev = device or rc.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev is not None:
        defaults["device"] = torch.device(dev)
    rs = build_rewards(rc.rewards, combine=rc.combine, **defaults)
    return RewardServer(rs, host, port)


def _serve_rewards(args: argparse.Namespace) -> int:
    server = build_server(args.config, host=args.host, port=args.port, device=args.device)
    info = server.health()
    print(f"serving rewards {', '.join(info['rewards'])} at {server.url} (GET /health, POST /score); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    finally:
        server.httpd.server_close()
    return 0


def _eval_setting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-run-code", action="store_true", help="allow importing a module (e.g. a reward plug-in) that sits in the run folder itself")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: the run's train.eval_prompts")
    p.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's train.seed)")
    p.add_argument("--samples-per-prompt", type=int, default=None, help="default: the run's train.eval_samples_per_prompt")


def _check_pipeline(args: argparse.Namespace) -> int:
    """``flowrl check-pipeline``: the conformance kit (flowrl.testing) on a saved pipeline or a tiny family."""
    import json
    import tempfile
    from pathlib import Path

    from flowrl.config import ConfigError
    from flowrl.pipelines.tiny_modular import TINY_FAMILIES, family_of
    from flowrl.testing import check_family, check_pipeline, table

    kw = {"num_steps": args.steps}
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    if args.height or args.width:
        kw["height"], kw["width"] = args.height, args.width
    if args.option:
        opts = {}
        for item in args.option:
            if "=" not in item:
                raise ConfigError(f"--option expects NAME=VALUE (a pipeline call input, YAML value), got '{item}'.")
            import yaml

            k, v = item.split("=", 1)
            opts[k] = yaml.safe_load(v)
        kw["adapter_options"] = opts
    results = []
    names = list(TINY_FAMILIES) if args.table else []
    if not args.table:
        if not args.target:
            raise ConfigError("flowrl check-pipeline needs a pipeline folder or a tiny family name (or --table).")
        path = Path(args.target)
        if path.is_dir():
            import diffusers

            if (path / "model_index.json").exists():
                pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
            else:
                pipe = diffusers.ModularPipeline.from_pretrained(str(path))
                pipe.load_components()
            results.append(check_pipeline(pipe, family=path.name, **kw))
        else:
            fam = family_of(args.target)
            if fam is None:
                raise ConfigError(f"'{args.target}' is neither a pipeline folder nor a tiny family. Tiny families: {', '.join(TINY_FAMILIES)}.")
            names = [fam]
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            results.append(check_family(name, d, **kw))
    print(table(results))
    for r in results:
        for note in r.notes:
            print(f"note ({r.family}): {note}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from flowrl import __version__

    parser = argparse.ArgumentParser(prog="flowrl", description="RL fine-tuning of flow-matching models and causal LMs.",
                                     epilog=DOCS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"flowrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    argv_seen = sys.argv[1:] if argv is None else argv
    wants_help = any(a in ("-h", "--help") for a in argv_seen)  # the preset list imports the methods: only for --help
    p = sub.add_parser("train", help="run a training job from a YAML config", epilog=_train_epilog() if wants_help else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: built-in defaults); shipped ones: assets/configs/*.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. train.learning_rate=1e-4 or algorithm=grpo_guard")
    p.add_argument("--allow-config-change", action="store_true", help="resume with settings that differ from the run's config.yaml (listed otherwise, and refused)")
    p.set_defaults(fn=_train)
    p = sub.add_parser("config", help="inspect a config without running it")
    csub = p.add_subparsers(dest="config_command", required=True)
    p = csub.add_parser("show", help="print the resolved config (preset filled in), the settings that override the preset, and run every pre-start check")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=_config_show)
    p = sub.add_parser("export", help="write a run's evaluated LoRA as diffusers/PEFT files (or merged weights) with a model card")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory (train.output_dir)")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--merge", action="store_true", help="fuse the LoRA into the transformer and save the whole pipeline (diffusers) or model (LMs)")
    p.add_argument("--checkpoint", help="export this checkpoint's weights (its EMA when the run kept one) instead of the evaluated ones")
    p.set_defaults(fn=_export)
    for name, fn, help_text in (
        ("sample", _sample, "sample a run's (or a config's) evaluation prompts into one labelled PNG grid; videos into mp4/WebP files"),
        ("eval", _eval, "evaluate a run's weights as the run did; writes eval.json and prints a table"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--run", help="a run directory (train.output_dir): its config, evaluated weights and evaluation settings")
        p.add_argument("--config", help="YAML config (model, sampler, rewards, prompts); with --run, replaces the run's")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--lora", help="a LoRA folder (<run>/lora, or any saved with save_lora_weights), loaded with stock load_lora_weights")
        p.add_argument("--checkpoint", help="a checkpoint folder (<run>/checkpoints/iter_NNNNNN); its EMA when the run kept one")
        p.add_argument("--base", action="store_true", help="the base model (no trained weights)")
        _eval_setting_args(p)
        if name == "sample":
            p.add_argument("--out", default="samples.png", help="PNG grid; video models also write <out without .png>/NNNN.mp4 (or .webp); language models write Markdown (samples.md)")
            p.add_argument("--fps", type=float, default=16.0, help="video frame rate of the written files")
            p.add_argument("--video-format", default="auto", choices=["auto", "mp4", "webp"], help="auto: mp4 when PyAV is installed, else animated WebP")
        else:
            p.add_argument("--out", default=None, help="where to write the JSON report (default: <run>/eval.json with --run, else ./eval.json)")
            p.add_argument("--category", help="metadata column to break results down by (default: category, else tag)")
            p.add_argument("--benchmark", help="also print a benchmark's own table: geneval (reward geneval, GenEval's metadata) or ocr")
        p.add_argument("--prompts", help="a prompt file to evaluate on (.jsonl with metadata such as GenEval's evaluation_metadata.jsonl, .txt, .csv, ...)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("gallery", help="a static HTML site comparing base and tuned samples of one or more runs")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories; one column each (after the base)")
    p.add_argument("--out", default="gallery", help="output folder; open OUT/index.html (default ./gallery)")
    p.add_argument("--checkpoints", action="store_true", help="also a column per intermediate checkpoint of each run")
    p.add_argument("--config", help="YAML config for the base model and prompts when no run is given")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--lora", action="append", help="an extra column: a LoRA folder (repeatable)")
    p.add_argument("--checkpoint", action="append", help="an extra column: a checkpoint folder (repeatable)")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first N evaluation prompts")
    _eval_setting_args(p)
    p.set_defaults(fn=_gallery)
    p = sub.add_parser("serve-rewards", help="serve a reward set over HTTP for trainers in other processes (reward `remote`)")
    p.add_argument("--config", required=True, help="YAML: a training config's reward section, or that section alone (rewards: {pickscore: 1.0})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=18090)
    p.add_argument("--device", default=None, help="device of the reward models (cpu, cuda:1, auto); default: the file's device")
    p.set_defaults(fn=_serve_rewards)
    p = sub.add_parser("check-pipeline", help="conformance kit: ratio 1 per kernel, stock parity, LoRA round trip, step costs of a pipeline on flowrl's modular path or hand adapter")
    p.add_argument("target", nargs="?", help="a saved pipeline folder, or a tiny family name / pipeline class (offline random weights)")
    p.add_argument("--table", action="store_true", help="every tiny family, as the Markdown table of docs/models.md")
    p.add_argument("--steps", type=int, default=3, help="denoising steps of every check (default 3)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's in the kit, 1 for a folder)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="a pipeline call input, e.g. num_frames=5")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.set_defaults(fn=_check_pipeline)
    p = sub.add_parser("pretrain-digits", help="pretrain the embedded digits text-to-image model")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_pretrain_digits)
    args = parser.parse_args(argv)
    if getattr(args, "trust_run_code", False):
        from flowrl.registry import trust_run_code

        trust_run_code()
    try:
        return args.fn(args)
    except Exception as exc:
        if type(exc).__name__ == "TrainingInterrupted":  # SIGTERM/SIGINT: saved, then stopped
            print(f"flowrl: {_one_line(exc)}", file=sys.stderr)
            return exc.exit_code
        if _is_user_error(exc):  # clear one-line errors for config/input mistakes
            print(f"flowrl: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("flowrl: interrupted", file=sys.stderr)
        return 130


DOCS_EPILOG = """documentation (docs/ in the source tree):
  configuration.md   config fields, presets and what a config overrides, checks before a run
  algorithms.md      every preset: its paper, defaults and where flowrl differs
  evaluation.md      flowrl eval / sample / gallery / export
  language-models.md causal LMs: tiny-llama, GGUF, the LM presets
  performance.md     threads (OMP_NUM_THREADS), memory, speed knobs
  rewards.md         built-in rewards, custom rewards and their column names"""


def _train_epilog() -> str:
    """``flowrl train --help``: the presets by model kind, and where to read more."""
    try:
        from flowrl.algorithms import PRESETS
        from flowrl.plugins import import_builtin_components

        import_builtin_components()
        lm = [n for n in PRESETS.names() if PRESETS.get(n).kernel == "token" and PRESETS.get(n).rollout == "full"]
        other = [n for n in PRESETS.names() if n not in lm]
    except Exception:  # noqa: BLE001 - help must print even if a plug-in is broken
        lm, other = [], []
    import textwrap

    wrap = lambda names: textwrap.fill(", ".join(names), width=96, initial_indent="  ", subsequent_indent="  ")  # noqa: E731
    return (
        "algorithm presets (--set algorithm=NAME; a config states only what differs from its preset):\n"
        f" diffusion / masked models:\n{wrap(other)}\n language models (model.kind causal_lm):\n{wrap(lm)}\n\n"
        "examples:\n  flowrl train --config assets/configs/digits.yaml\n"
        "  flowrl config show --config assets/configs/digits.yaml --set algorithm=grpo_guard\n\n" + DOCS_EPILOG
    )


def _export(args: argparse.Namespace) -> int:
    from flowrl import export

    out = export.export_run(args.run, args.out, merge=args.merge, checkpoint=args.checkpoint)
    print(f"exported {'merged weights' if args.merge else 'the LoRA'} of {args.run} to {out} (model card: {out / 'README.md'})")
    return 0


#: exception types whose message tells the user what to fix (printed as one line, exit code 2)
USER_ERROR_TYPES = ("ConfigError", "RewardError", "CheckpointError", "NonFiniteUpdateError")


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError):
        return True
    return any(cls.__name__ in USER_ERROR_TYPES for cls in type(exc).__mro__)


def _one_line(exc: BaseException) -> str:
    """The message on one line (an error printed for a person: no traceback, no line breaks)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
