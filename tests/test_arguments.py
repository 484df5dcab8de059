"""Bad layouts and paths fail before any work, with one line naming the flag."""

import re
import subprocess
import sys
import time

import pytest
from helpers.distributed_run import REPO

from megatron_ext.training.arguments import ArgumentError, build_parser, validate


def _validate(argv, world_size=1):
    return validate(build_parser().parse_args(argv), world_size)


@pytest.mark.parametrize(
    "argv,world_size,message",
    [
        (
            ["--model", "crystal-7b", "--tensor-model-parallel-size", "4"],
            4,
            "--tensor-model-parallel-size 4 does not divide the FFN width 10922 "
            "(10922 = 2 x 43 x 127: TP must be 1 or 2)",
        ),
        (
            ["--model", "crystal-tiny", "--tensor-model-parallel-size", "3"],
            3,
            "--tensor-model-parallel-size 3 does not divide the 4 attention heads",
        ),
        (
            ["--model", "crystal-7b", "--pipeline-model-parallel-size", "3"],
            3,
            "--pipeline-model-parallel-size 3 does not divide the 32 layers",
        ),
        (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not a multiple of TP x PP = 2 x 1"),
        (
            ["--global-batch-size", "6", "--micro-batch-size", "2"],
            2,
            "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2",
        ),
        (
            ["--load", "/nonexistent/ckpt", "--exit-on-missing-checkpoint"],
            1,
            "--load /nonexistent/ckpt: no checkpoint there (no latest_checkpointed_iteration.txt), and "
            "--exit-on-missing-checkpoint is given",
        ),
        (["--model", "crystal-13b"], 1, "--model 'crystal-13b' is not a preset"),
        (
            ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
            2,
            "--num-layers-per-virtual-pipeline-stage 3 does not divide the 2 layers of a pipeline stage",
        ),
        (["--data-path", "0.5", "/nonexistent/prefix"], 1, "--data-path: /nonexistent/prefix.bin does not exist"),
        (["--bf16"], 1, "--bf16 needs a GPU"),
        (["--split", "not,a,split"], 1, "--split not,a,split: expected up to three non-negative proportions"),
        (["--split", "0,0"], 1, "--split 0,0: expected up to three non-negative proportions"),
        (["--recompute-act"], 1, "unrecognized arguments: --recompute-act"),  # no prefix of --recompute-activations
        (["--pretrained-checkpoint", "/nonexistent"], 1, "--pretrained-checkpoint /nonexistent: no checkpoint there"),
        (["--phases-start", "a:1"], 1, "--phases-start a:1: needs --phases (the phase it names)"),
        (["--eval-iters", "-1"], 1, "--eval-iters must be >= 0 (0: no validation)"),
    ],
    ids=[
        "tp_ffn",
        "tp_heads",
        "pp_layers",
        "world",
        "batch",
        "load",
        "preset",
        "vp",
        "data",
        "bf16_on_cpu",
        "split",
        "split_zero",
        "abbrev",
        "pretrained",
        "start_no_phases",
        "eval_iters",
    ],  # fmt: skip
)
def test_bad_layout_is_named(argv, world_size, message):
    argv = argv if "--data-path" in argv else argv + ["--mock-data"]
    with pytest.raises(ArgumentError) as err:
        _validate(argv, world_size)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_phases_start_names_a_phase_and_a_step_within_it():
    phases = ["--phases", str(REPO / "tests" / "data" / "phases_small.yaml")]  # text: 4 steps, text+code: 6
    phases += ["--tokenizer-model", str(REPO / "data" / "demo" / "crystal_demo.model")]
    for start, point in (("text:0", (0, 0)), ("text+code:3", (1, 3)), ("2:5", (1, 5))):
        assert _validate(phases + ["--phases-start", start]).data.start_point == point
    for start, message in (
        ("text:4", "--phases-start text:4: phase 'text' has 4 steps (0-3)"),
        ("code:1", "--phases-start code:1: expected PHASE:STEP, PHASE one of text, text+code or 1-2"),
        ("3:0", "--phases-start 3:0: expected PHASE:STEP"),
        ("text", "--phases-start text: expected PHASE:STEP"),
        ("2:1", "--phases-start 2:1 is iteration 5, not before --train-iters 5"),
    ):
        with pytest.raises(ArgumentError, match=re.escape(message)):
            _validate(phases + ["--phases-start", start] + (["--train-iters", "5"] if start == "2:1" else []))


def test_a_new_width_keeps_the_mup_base_width():
    """--hidden-size 8192 on crystal-7b (base width 256): width scale 1/32, not the 4096-wide model's 1/16."""
    run = _validate(["--model", "crystal-7b", "--mock-data", "--hidden-size", "8192"])
    assert run.crystal.mup_width_scale == 256 / 8192 and run.crystal.output_multiplier == 2.22 / 32
    assert _validate(["--model", "crystal-7b", "--mock-data"]).crystal.mup_width_scale == 0.0625
    assert (
        _validate(["--model", "crystal-7b", "--mock-data", "--hidden-size", "4096"]).crystal.mup_width_scale == 0.0625
    )


def test_load_of_a_directory_not_made_yet_starts_fresh(tmp_path):
    """Megatron-LM's meaning, which a first launch of a --save = --load script relies on: accepted (the
    run prints that it starts fresh); --exit-on-missing-checkpoint refuses it (test_bad_layout_is_named)."""
    run = _validate(["--mock-data", "--load", str(tmp_path / "not_yet"), "--save", str(tmp_path / "not_yet")], 1)
    assert run.checkpoint.load == str(tmp_path / "not_yet") and not (tmp_path / "not_yet").exists()


def test_good_layout_derives_sizes(tmp_path):
    run = _validate(
        [
            "--model",
            "crystal-7b",
            "--mock-data",
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "4",
            "--num-layers-per-virtual-pipeline-stage",
            "2",
            "--global-batch-size",
            "2112",
            "--micro-batch-size",
            "1",
            "--load",
            str(tmp_path),
        ],
        528,
    )
    layout = run.layout
    assert (layout.data_parallel_size, layout.virtual_pipeline_model_parallel_size) == (66, 4)
    assert layout.num_microbatches(run.optimizer.global_batch_size) == 32
    assert run.crystal.num_layers == 32


@pytest.mark.launch
def test_cli_fails_fast_with_one_line():
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "pretrain_crystal.py"),
            "--model",
            "crystal-7b",
            "--mock-data",
            "--tensor-model-parallel-size",
            "4",
        ],
        capture_output=True,
        text=True,
        env={"WORLD_SIZE": "4", "PATH": ""},
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("pretrain_crystal.py: error: --tensor-model-parallel-size 4")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.perf_counter() - start < 30  # no process group, no model: just imports and the check


@pytest.mark.launch
def test_megatron_workarounds_are_explicit_and_version_checked(monkeypatch):
    """Importing the project patches nothing; apply() patches once, and refuses another Megatron-Core."""
    probe = (
        "import megatron_ext.checkpointing, megatron_ext.training.loop\n"
        "from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D\n"
        "print(D._set_main_param_and_optimizer_states.__module__)\n"
        "from megatron_ext import megatron_workarounds; megatron_workarounds.apply()\n"
        "print(D._set_main_param_and_optimizer_states.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["megatron.core.optimizer.distrib_optimizer", "megatron_ext.megatron_workarounds"], (
        out.stderr
    )

    from megatron.core import package_info

    from megatron_ext import megatron_workarounds

    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    with pytest.raises(
        megatron_workarounds.UnsupportedMegatronVersion,
        match=r"^megatron-core 0\.17\.0 is installed; .* are for 0\.16\.1: pip install megatron-core==0\.16\.1$",
    ):
        megatron_workarounds.apply()


def test_an_lr_flag_with_phases_is_an_error_not_dropped():
    """The phases file sets the lr schedule; an --lr* flag beside it used to be replaced silently."""
    phases = str(REPO / "tests" / "data" / "phases_small.yaml")
    tokenizer = str(REPO / "data" / "demo" / "crystal_demo.model")
    base = ["--model", "crystal-test", "--phases", phases, "--tokenizer-model", tokenizer]
    for flag, value in (("--lr", "0.01"), ("--min-lr", "0.001"), ("--lr-decay-style", "cosine")):
        with pytest.raises(ArgumentError) as e:
            _validate(base + [flag, value])
        assert str(e.value) == (
            f"{flag} {float(value) if flag != '--lr-decay-style' else value}: with --phases {phases} the phases file "
            "sets the lr schedule (each phase's lr: peak, min, warmup_iters, decay_iters, decay_style); drop the flag"
        )
    opt = _validate(base).optimizer
    assert (opt.lr, opt.min_lr, opt.lr_decay_style) == (5.0e-2, 5.0e-3, "cosine")  # the first phase's
    opt = _validate(["--model", "crystal-test", "--mock-data"]).optimizer
    assert (opt.lr, opt.min_lr, opt.lr_warmup_iters, opt.lr_decay_style) == (1.2e-2, 0.0, 0, "linear")


def test_a_batch_size_flag_that_every_phase_overrides_is_an_error(tmp_path):
    phases = tmp_path / "own_batches.yaml"
    demo = REPO / "data" / "demo"
    phases.write_text(
        f"sources: {{text: {{prefixes: [{demo / 'text_text_document'}]}}}}\n"
        "phases:\n  - {name: a, iters: 2, global_batch_size: 8, blend: {text: 1.0}, lr: {peak: 1.0e-3}}\n"
        "  - {name: b, iters: 2, global_batch_size: 16, blend: {text: 1.0}, lr: {peak: 1.0e-3}}\n"
    )
    base = ["--model", "crystal-test", "--tokenizer-model", str(REPO / "data" / "demo" / "crystal_demo.model")]
    with pytest.raises(ArgumentError) as e:
        _validate(base + ["--phases", str(phases), "--global-batch-size", "16"])
    assert str(e.value) == (
        f"--global-batch-size 16: every phase of {phases} sets its own global_batch_size; drop the flag"
    )
    assert _validate(base + ["--phases", str(phases)]).optimizer.global_batch_size == 8
    small = REPO / "tests" / "data" / "phases_small.yaml"  # its phases take the flag's batch size
    assert _validate(base + ["--phases", str(small), "--global-batch-size", "16"]).optimizer.global_batch_size == 16


def test_every_flag_is_a_section_field_with_a_default_and_a_doc():
    """The configuration's sections are the one definition of the command line: each flag field has a
    default and a docstring, and the parser holds no flag that is not such a field or a row of the table of
    Megatron-LM flags (training/megatron_flags.py), which names no section field."""
    import dataclasses

    from megatron_ext.training.megatron_flags import FLAGS
    from megatron_ext.training.run_config import SECTION_CLASSES, field_docs, flag_fields, flag_name

    defined = {}
    for name, cls in SECTION_CLASSES.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.name in docs and docs[f.name], f"{name}.{f.name} has no docstring"
        for f in flag_fields(cls):
            assert f.default is not dataclasses.MISSING, f"{name}.{f.name} has no default"
            assert flag_name(f) not in defined, f"{flag_name(f)} is defined twice"
            defined[flag_name(f)] = f
    parsed = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings != ["-h", "--help"]}
    table = {f.flag for f in FLAGS}
    assert not table & set(defined) and len(table) == len(FLAGS)
    assert set(parsed) == set(defined) | table  # no flag outside the sections and the table, none missing
    help_text = " ".join(build_parser().format_help().split())
    for flag, f in defined.items():
        assert re.search(rf"{re.escape(flag)}[ ,\]]", help_text), flag
        if f.default not in (None, False, ()):
            shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            assert f"(default: {shown})" in " ".join(parsed[flag].help.split()), flag
    assert "--override-opt_param-scheduler" in parsed["--override-opt-param-scheduler"].option_strings  # alias


def test_run_config_json_round_trips_into_the_same_configuration(tmp_path):
    """run_config.json holds the flags as given and the world size, which validate again into an equal
    RunConfig, and every resolved value for people to read."""
    import json

    from megatron_ext.training.arguments import read_run_config

    tokenizer = str(REPO / "data" / "demo" / "crystal_demo.model")
    phases = str(REPO / "tests" / "data" / "phases_small.yaml")
    for argv, world in (
        (["--model", "crystal-test", "--mock-data", "--tensor-model-parallel-size", "2", "--lr", "0.003"], 4),
        (["--model", "crystal-test", "--phases", phases, "--tokenizer-model", tokenizer, "--profile-ranks", "0", "1",
          "--eval-interval", "5", "--save", str(tmp_path / "run")], 1),
    ):  # fmt: skip
        run = _validate(argv, world)
        path = tmp_path / "run_config.json"
        path.write_text(run.to_json())
        again = read_run_config(str(path))
        assert again == run and again.flags == run.flags
        saved = json.loads(path.read_text())
        assert saved["world_size"] == world
        assert saved["resolved"]["layout"]["data_parallel_size"] == run.layout.data_parallel_size
        assert saved["resolved"]["optimizer"]["lr"] == run.optimizer.lr
    assert saved["resolved"]["optimizer"]["lr"] == 5.0e-2  # the phases file's, resolved
    assert saved["resolved"]["eval"]["eval_results_jsonl"] == str(tmp_path / "run" / "eval_results.jsonl")
    assert saved["resolved"]["profile"]["profile_ranks"] == [0, 1]


FULL = "--recompute-granularity full --recompute-method"
REFUSED = {  # flags -> the start of the one line
    "mlp": ("--recompute-granularity selective --recompute-modules mlp", "--recompute-modules mlp: Megatron-Core"),
    "layernorm": ("--recompute-activations --recompute-modules layernorm", "--recompute-modules layernorm: Megatron"),
    "moe": ("--recompute-activations --recompute-modules moe", "--recompute-modules moe: Crystal has no MoE layers"),
    "no_method": ("--recompute-granularity full", "--recompute-granularity full needs --recompute-method uniform"),
    "no_layers": (f"{FULL} block", "--recompute-method block needs --recompute-num-layers N >= 1"),
    "method_alone": ("--recompute-method uniform --recompute-num-layers 1", "--recompute-method and --recompute-num"),
    "both": (f"--recompute-activations {FULL} uniform --recompute-num-layers 1", "--recompute-activations is --rec"),
    "too_many": (f"{FULL} block --recompute-num-layers 3 --pipeline-model-parallel-size 2", "--recompute-num-layers 3 "
                 "is more than the 2 layers of a model chunk"),
    "gather": ("--overlap-param-gather", "--overlap-param-gather needs --use-distributed-optimizer"),
    "bf16": ("--grad-reduce-in-bf16", "--grad-reduce-in-bf16 needs --bf16"),
    "bucket": ("--ddp-bucket-size 0", "--ddp-bucket-size must be >= 1"),
    "timeout": ("--distributed-timeout-minutes 0", "--distributed-timeout-minutes must be > 0"),
}  # fmt: skip


@pytest.mark.parametrize("name", REFUSED)
def test_memory_and_communication_flags_refuse_in_one_line(name):
    """What Megatron-Core 0.16.1 cannot do on this model, or what makes no sense, is one line naming it."""
    flags, message = REFUSED[name][0].split(), REFUSED[name][1]
    with pytest.raises(ArgumentError) as err:
        _validate(
            ["--model", "crystal-test", "--mock-data", *flags],
            world_size=2 if "--pipeline-model-parallel-size" in flags else 1,
        )
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_recomputation_and_overlap_reach_megatron_cores_configs():
    run = _validate(["--model", "crystal-test", "--mock-data", "--recompute-granularity", "full", "--recompute-method",
                     "uniform", "--recompute-num-layers", "2", "--use-distributed-optimizer", "--overlap-grad-reduce",
                     "--overlap-param-gather", "--ddp-bucket-size", "1000000"], world_size=2)  # fmt: skip
    assert run.recompute.transformer_options() == {
        "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2,
    }  # fmt: skip
    selective = _validate(["--model", "crystal-test", "--mock-data", "--recompute-activations"]).recompute
    assert selective.transformer_options() == {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    assert (run.layout.overlap_grad_reduce, run.layout.overlap_param_gather, run.layout.ddp_bucket_size) == (
        True, True, 1_000_000,
    )  # fmt: skip
    assert run.layout.distributed_timeout_minutes == 10 and not run.layout.grad_reduce_in_bf16
