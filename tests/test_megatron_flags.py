"""Megatron-LM launch scripts through pretrain_crystal.py's command line: every flag of LLM360's GPU port
of Crystal and of Megatron-LM's Llama 3 8B FP8 example is accepted with Megatron-LM's meaning or refused in
one line naming the flag, its reason and the equivalent; none is unknown (training/megatron_flags.py)."""

import re

import pytest
from helpers.distributed_run import REPO

from megatron_ext.training.arguments import ArgumentError, check_command_line
from megatron_ext.training.megatron_flags import FLAGS, table_markdown

DEMO_PREFIX = str(REPO / "data" / "demo" / "code_text_document")

# LLM360/crystalcoder-train, branch yuki-dev @ 235400b6, finetune/Megatron-LM/rank_cmd_phase2.sh: Crystal's
# phase 2 on Megatron-LM (paths and shell variables replaced by values).
LLM360_PHASE2 = """--seq-length 2048 --micro-batch-size 1 --global-batch-size 2048 --max-position-embeddings 2048
--tokenizer-type NullTokenizer --load CKPT --save CKPT --exit-on-missing-checkpoint --use-checkpoint-args
--no-load-optim --no-load-rng --bf16 --no-position-embedding --norm-epsilon 1e-5 --use-flash-attn
--no-query-key-layer-scaling --train-iters 214301 --lr 0.0087825 --lr-decay-iters 214301 --lr-decay-style linear
--lr-warmup-iters 86 --min-lr 0.00013679 --weight-decay 0.1 --clip-grad 1.0 --data-path DATA --vocab-size 32032
--dataloader-type cyclic --log-interval 1 --save-interval 100 --eval-interval 2000 --eval-iters 10
--distributed-backend nccl --use-rotary-position-embeddings --rotary-percent 0.25 --adam-beta1 0.9
--adam-beta2 0.95 --adam-eps 1e-08 --attention-dropout 0.0 --hidden-dropout 0.0 --attention-softmax-in-fp32
--overlap-grad-reduce --tensorboard-dir TB --seed 42 --sequence-parallel --use-mup --mup-width-scale 0.0625
--mup-output-alpha 2.22 --mup-embeddings-scale 14.6 --mup-scale-qk-dot-by-d --tensorboard-queue-size 10
--log-timers-to-tensorboard --log-memory-to-tensorboard --log-params-norm --rotary-interleave-repeat
--rotary-stay-fp32"""
# NVIDIA/Megatron-LM @ 157006d6, examples/llama/train_llama3_8b_h100_fp8.sh (its mock-data branch).
LLAMA3_8B_FP8 = """--use-mcore-models --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
--num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128 --seq-length 8192
--max-position-embeddings 8192 --position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0
--attention-dropout 0.0 --hidden-dropout 0.0 --swiglu --init-method-std 0.0134 --attention-backend fused
--apply-layernorm-1p --untie-embeddings-and-output-weights --disable-bias-linear --micro-batch-size 1
--global-batch-size 128 --train-samples 1953125000 --lr-decay-samples 1949218748 --lr-warmup-samples 3906252
--lr 0.00015 --min-lr 0.00001 --decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine
--clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16
--cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc --empty-unused-memory-level 1
--exit-duration-in-mins 235 --fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max
--fp8-param-gather --tensor-model-parallel-size 1 --context-parallel-size 1 --sequence-parallel
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --mock-data --tokenizer-type NullTokenizer
--vocab-size 128256 --data-cache-path CACHE --tiktoken-pattern v2 --split 99,1,0
--no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers 1 --log-interval 1 --eval-iters 32
--eval-interval 100 --save-interval 1000 --log-throughput --profile --profile-step-start 4 --profile-step-end 6
--ckpt-format torch_dist --distributed-timeout-minutes 60 --save CKPT --load CKPT --tensorboard-dir TB"""

# NVIDIA/Megatron-LM @ 157006d6, examples/gpt3/train_gpt3_175b_distributed.sh.
GPT3_175B = """--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048
--max-position-embeddings 2048 --attention-backend auto --micro-batch-size 1 --global-batch-size 1536
--rampup-batch-size 16 16 5859375
--train-iters 500000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0
--fp16 --lr 6.0e-5 --lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000
--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16 --data-path DATA --vocab-file VOCAB
--merge-file MERGES --split 949,50,1 --log-interval 100 --save-interval 10000 --eval-interval 1000 --save CKPT
--load CKPT --eval-iters 10 --tensorboard-dir TB"""

# What this machine refuses: a GPU's (bf16, nccl, FP8, --profile's CUDA profiler API) and Transformer Engine's
# (--attention-backend fused).
MACHINE = {
    "--bf16",
    "--distributed-backend",
    "--fp8-format",
    "--grad-reduce-in-bf16",
    "--attention-backend",
    "--profile",
}


def _placeholders(tmp_path) -> dict[str, str]:
    """The paths the flag lists name by placeholder, pointed at this test's (an empty checkpoint directory)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("0")
    return {"CKPT": str(ckpt), "DATA": DEMO_PREFIX, "TB": str(tmp_path / "tb"), "CACHE": str(tmp_path / "cache"),
            "TOKENIZER": str(REPO / "data" / "demo" / "crystal_demo.model"), "EXP": "exp"}  # fmt: skip


def _flags(script: str, tmp_path) -> list[list[str]]:
    """The script's flags, each with its values, paths pointed at this test's."""
    values = _placeholders(tmp_path)
    flags: list[list[str]] = []
    for token in script.split():
        if token.startswith("--"):
            flags.append([token])
        else:
            flags[-1].append(values.get(token, token))
    return flags


def _verdict(argv: list[str], world_size: int = 1) -> str | None:
    try:
        check_command_line(argv, world_size)
    except ArgumentError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "script", [LLM360_PHASE2, LLAMA3_8B_FP8, GPT3_175B], ids=["llm360_phase2", "llama3_8b_fp8", "gpt3_175b"]
)
def test_each_flag_of_the_scripts_is_accepted_or_refused_with_its_reason(script, tmp_path):
    accepted, refused = [], []
    flags = _flags(script, tmp_path)
    given = {f[0]: f for f in flags}
    needs = {  # a flag alone is refused for what it needs beside it: given with it, as the script does
        "--exit-on-missing-checkpoint": ["--load"],
        "--no-load-optim": ["--load"],
        "--save-interval": ["--save"],
        "--overlap-param-gather": ["--use-distributed-optimizer"],
        "--lr-decay-samples": ["--train-samples"],
        "--lr-warmup-samples": ["--train-samples"],
        "--profile-step-start": ["--profile", "--use-pytorch-profiler", "--profile-step-end"],
        "--profile-step-end": ["--profile", "--use-pytorch-profiler", "--profile-step-start"],
    }
    for flag in flags:
        base = ["--model", "crystal-7b"] + ([] if flag[0] in ("--data-path", "--mock-data") else ["--mock-data"])
        base += [x for other in needs.get(flag[0], []) for x in given.get(other, [other])]
        parallel = flag[0] in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")
        line = _verdict(base + flag, int(flag[1]) if parallel else 1)  # the world its layout asks for
        if line is None:
            accepted.append(flag[0])
            continue
        assert "unrecognized arguments" not in line and "invalid choice" not in line, line
        assert "\n" not in line and line.startswith(flag[0]), line  # the flag first, one line
        refused.append(flag[0])
    expected = {
        LLM360_PHASE2: {"--dataloader-type"},
        LLAMA3_8B_FP8: {
            "--group-query-attention", "--num-query-groups", "--rotary-base", "--rotary-percent", "--init-method-std",
            "--apply-layernorm-1p", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
            "--decoupled-lr", "--decoupled-min-lr",
            "--fp8-param-gather",
        },
        GPT3_175B: {
            "--rampup-batch-size", "--init-method-std", "--fp16", "--vocab-file", "--merge-file",
            "--tensor-model-parallel-size",  # TP 8 does not divide crystal-7b's FFN width 10922
            "--num-attention-heads",  # 96 heads do not divide crystal-7b's 4096 (with --hidden-size 12288 they do)
        },
    }[script]  # fmt: skip
    assert set(refused) - MACHINE == expected, sorted(set(refused) - MACHINE)
    assert len(accepted) + len(refused) == len(flags) and len(accepted) > len(refused)


FUNCTIONAL_TEST_FLAGS = REPO / "tests" / "data" / "megatron_lm_functional_test_flags.txt"
# What a flag of those configurations needs beside it to be judged alone (as its configuration gives it).
BESIDE = {
    "--async-save": ["--save", "CKPT"],
    "--use-persistent-ckpt-worker": ["--save", "CKPT", "--async-save"],  # refused on CPU: the machine's
    "--save-interval": ["--save", "CKPT"],
    "--save-retain-interval": ["--save", "CKPT", "--save-interval", "1000"],
    "--no-load-optim": ["--load", "CKPT"],
    "--use-checkpoint-args": ["--load", "CKPT"],
    "--use-checkpoint-opt_param-scheduler": ["--load", "CKPT"],
    "--finetune": ["--load", "CKPT"],
    "--ckpt-fully-parallel-load": ["--load", "CKPT"],
    "--overlap-param-gather": ["--use-distributed-optimizer"],
    "--lr-decay-samples": ["--train-samples", "1953125000"],
    "--lr-warmup-samples": ["--train-samples", "1953125000"],
    "--recompute-granularity": ["--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "--recompute-method": ["--recompute-granularity", "full", "--recompute-num-layers", "1"],
    "--recompute-num-layers": ["--recompute-granularity", "full", "--recompute-method", "uniform"],
    "--num-layers-per-virtual-pipeline-stage": ["--pipeline-model-parallel-size", "2"],
    "--num-virtual-stages-per-pipeline-rank": ["--pipeline-model-parallel-size", "2"],
    "--wandb-entity": ["--wandb-project", "p"],
    "--wandb-exp-name": ["--wandb-project", "p"],
    "--wandb-save-dir": ["--wandb-project", "p"],
}


def test_every_flag_of_megatron_lms_functional_tests_is_accepted_or_refused_with_its_reason(tmp_path):
    """The 159 flags (220 flag-value pairs) of Megatron-LM's 151 dense GPT training configurations
    (tests/data/megatron_lm_functional_test_flags.txt names the commit and the selection): none unknown; each
    refusal one line starting with the flag; the refused ones are these, the machine's aside."""
    values = _placeholders(tmp_path)
    lines = [line.split() for line in FUNCTIONAL_TEST_FLAGS.read_text().splitlines() if not line.startswith("#")]
    refused = set()
    for flag, *given in lines:
        argv = ["--model", "crystal-7b"] + ([] if flag in ("--data-path", "--mock-data") else ["--mock-data"])
        argv += [values.get(v, v) for v in BESIDE.get(flag, []) + [flag, *given]]
        layout = flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")
        world = int(given[0]) if layout else 2 if "--pipeline-model-parallel-size" in BESIDE.get(flag, []) else 1
        line = _verdict(argv, world)
        if line is None:
            continue
        assert "unrecognized arguments" not in line and "invalid choice" not in line, line
        assert "\n" not in line and line.startswith(flag), line
        refused.add(flag)
    assert len(lines) == 220 and len({f for f, *_ in lines}) == 159
    expected = {
        "--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split",
        "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
        "--microbatch-group-size-per-virtual-pipeline-stage", "--overlap-p2p-communication-warmup-flush",
        "--overlap-param-gather-with-optimizer-step", "--defer-embedding-wgrad-compute", "--wgrad-deferral-limit",
        "--tp-comm-overlap", "--tp-comm-overlap-cfg", "--use-tp-pp-dp-mapping", "--disable-gloo-process-groups",
        "--ddp-average-in-collective", "--num-distributed-optimizer-instances",
        "--context-parallel-size", "--cp-comm-type", "--hierarchical-context-parallel-sizes",
        "--expert-tensor-parallel-size", "--use-megatron-fsdp", "--use-torch-fsdp2",
        "--data-parallel-sharding-strategy", "--megatron-fsdp-main-params-dtype", "--megatron-fsdp-main-grads-dtype",
        "--megatron-fsdp-grad-comm-dtype",
        "--ckpt-format",  # torch and fsdp_dtensor (torch_dist is accepted)
        "--rerun-mode", "--error-injection-rate", "--error-injection-type", "--test-mode",
        "--apply-layernorm-1p", "--apply-query-key-layer-scaling", "--disable-bias-linear", "--group-query-attention",
        "--num-query-groups", "--normalization", "--qk-layernorm", "--squared-relu",
        "--untie-embeddings-and-output-weights", "--init-method-std", "--rotary-base", "--rotary-percent",
        "--max-position-embeddings",  # 1024, below the sequence length
        "--num-attention-heads",  # 48 does not divide 4096
        "--tensor-model-parallel-size",  # 4 and 8 do not divide the FFN width 10922
        "--decoupled-lr", "--decoupled-min-lr", "--fp16", "--fp8-param-gather", "--step-batch-size-schedule",
        "--eval-global-batch-size", "--fim-data", "--fim-rate", "--fim-spm-rate",
        "--tokenizer-type",  # GPTSentencePieceTokenizer: CrystalTokenizer reads the .model
        "--vocab-file", "--merge-file",
    }  # fmt: skip
    assert refused - MACHINE - {"--transformer-impl", "--use-persistent-ckpt-worker"} == expected, sorted(
        refused - MACHINE - expected
    )


def test_megatron_lms_other_forms_of_run_settings_mean_what_they_mean_there(monkeypatch):
    """--num-virtual-stages-per-pipeline-rank 2 at PP 2 of 4 layers = 1 layer per chunk; --no-rope-fusion turns
    the fused rotary kernel off on a GPU (its probe simulated) and only it; a refused tokenizer form names the
    one that reads its files."""
    from megatron_ext.kernels import selection
    from megatron_ext.kernels.selection import Probes

    def run(*argv, world=1):
        return check_command_line(["--model", "crystal-test", "--mock-data", *argv], world)

    chunks = run("--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2", world=2)
    layers = run("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", world=2)
    assert chunks.layout.virtual_pipeline_model_parallel_size == layers.layout.virtual_pipeline_model_parallel_size
    assert chunks.layout.virtual_pipeline_model_parallel_size == 2
    line = _verdict(["--model", "crystal-test", "--mock-data", "--pipeline-model-parallel-size", "2",
                     "--num-virtual-stages-per-pipeline-rank", "3"], 2)  # fmt: skip
    assert line == "--num-virtual-stages-per-pipeline-rank 3 does not divide the 2 layers of a pipeline stage"
    monkeypatch.setattr(selection, "probe", lambda: Probes(gpu_name="NVIDIA H100 80GB HBM3",
                                                           compute_capability=(9, 0), triton=True))  # fmt: skip
    fused, plain = run().kernels.path, run("--no-rope-fusion").kernels.path
    assert (fused.fused_rope, fused.fused_swiglu) == (True, True) and (plain.fused_rope, plain.fused_swiglu) == (
        False, True)  # fmt: skip
    assert "fused rope (Triton): off" in plain.describe()
    line = _verdict(["--model", "crystal-test", "--mock-data", "--tokenizer-type", "GPTSentencePieceTokenizer",
                     "--tokenizer-model", str(REPO / "data" / "demo" / "crystal_demo.model")])  # fmt: skip
    assert line == ("--tokenizer-type GPTSentencePieceTokenizer: refused: use CrystalTokenizer with the SentencePiece "
                    ".model (the model's pieces, then Crystal's specials)")  # fmt: skip


def test_llm360s_script_without_its_refusals_describes_crystal_7b(tmp_path):
    """Crystal in Megatron-LM's (and LLM360's muP) words is crystal-7b: accepted whole, with their meaning."""
    drop = {"--dataloader-type"} | MACHINE
    argv = ["--model", "crystal-7b"] + [x for f in _flags(LLM360_PHASE2, tmp_path) if f[0] not in drop for x in f]
    run = check_command_line(argv, 1)
    assert run.kernels.attention_backend == "flash"  # --use-flash-attn
    assert (run.optimizer.adam_eps, run.optimizer.lr, run.optimizer.lr_warmup_iters) == (1e-8, 0.0087825, 86)
    assert (run.crystal.seq_length, run.crystal.vocab_size, run.crystal.mup_width_scale) == (2048, 32032, 0.0625)
    assert run.data.tokenizer_type == "NullTokenizer" and run.data.tokenizer is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rotary-percent", "0.5"], "--rotary-percent 0.5: the model's rotary fraction is 0.25: the flag may only"),
        (["--mup-width-scale", "0.125"], "--mup-width-scale 0.125: the model's muP width scale is 0.0625"),
        (["--context-parallel-size", "2"], "--context-parallel-size 2: refused: no context parallelism"),
        (["--ckpt-format", "torch"], "--ckpt-format torch: refused: dist checkpoints (torch_dist) are the one format"),
        (["--fp16"], "--fp16: refused: Crystal trains in bf16: use --bf16"),
        (["--max-position-embeddings", "1024"], "--max-position-embeddings 1024: refused: rotary embeddings have no"),
        (["--use-flash-attn", "--attention-backend", "unfused"], "--use-flash-attn means --attention-backend flash"),
        (["--calculate-per-token-loss", "--loss-normalization", "positions"], "give one of them"),
        (["--tokenizer-type", "NullTokenizer", "--tokenizer-model", "x.model"], "NullTokenizer reads no file"),
        (["--profile"], "--profile brackets the steps with the CUDA profiler API, for nsys --capture-range="),
        (["--use-pytorch-profiler"], "--use-pytorch-profiler needs --profile"),
    ],
    ids=["preset", "mup", "cp", "ckpt", "fp16", "positions", "flash", "loss", "null_tokenizer", "profile", "torch"],
)
def test_a_disagreeing_value_is_one_line_naming_the_flag(argv, message):
    line = _verdict(["--model", "crystal-7b", "--mock-data", *argv])
    assert line is not None and message in line and "\n" not in line, line


def test_the_table_is_in_help_and_in_the_docs():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "pretrain_crystal.py", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    ).stdout
    flat = " ".join(out.split())
    assert "Megatron-LM flags for what this project always does" in flat
    for f in FLAGS:
        assert re.search(rf"{re.escape(f.flag)}\b", flat), f.flag
    assert "refused: Crystal trains in bf16: use --bf16" in flat
    assert table_markdown() in (REPO / "docs" / "training.md").read_text()


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_manual_gc_and_returning_cached_memory_change_no_loss(tmp_path):
    """Megatron-LM's --manual-gc / --manual-gc-interval, --empty-unused-memory-level (a no-op without CUDA) and
    --log-num-zeros-in-grad: the same losses step for step; the log says how garbage is collected and counts
    the zero gradients."""
    from helpers.distributed_run import TINY_RUN, read_metrics, train

    runs = {}
    for name, extra in (("plain", []), ("housekept", ["--manual-gc", "--manual-gc-interval", "2",
                        "--empty-unused-memory-level", "2", "--log-num-zeros-in-grad"])):  # fmt: skip
        metrics = tmp_path / f"{name}.jsonl"
        done = train(1, TINY_RUN + ["--train-iters", "3", "--metrics-jsonl", str(metrics), *extra])
        runs[name] = [(r["lm_loss"], r["grad_norm"]) for r in read_metrics(metrics)]
        if extra:
            assert "garbage collection: manual, every 2 steps" in done.stdout and "| num zeros " in done.stdout
            zeros = [r["num_zeros_in_grad"] for r in read_metrics(metrics)]
            assert all(isinstance(z, int) and z >= 0 for z in zeros) and len(zeros) == 3
    assert runs["housekept"] == runs["plain"] and len(runs["plain"]) == 3


def _megatron_lr(steps: float, warmup: float, decay: float, peak: float = 5e-2, low: float = 5e-3) -> float:
    """Megatron-LM's OptimizerParamScheduler.get_lr, linear decay, written out (its scheduler counts samples)."""
    if warmup > 0 and steps <= warmup:
        return peak * steps / warmup
    if steps > decay:
        return low
    return low + (peak - low) * (1 - (steps - warmup) / (decay - warmup))


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_sample_based_schedules_give_megatron_lms_iterations_and_learning_rates(tmp_path):
    """--train-samples 40 at batch 8: 5 steps, the lr counting samples (warm-up 12, decay 36, which end between
    steps); --lr-warmup-fraction 0.25 of 10 steps: a warm-up of 2.5 steps."""
    from helpers.distributed_run import TINY_RUN, read_metrics, train

    base = [x for i, x in enumerate(TINY_RUN) if "--lr-warmup-iters" not in TINY_RUN[max(i - 1, 0) : i + 1]]
    runs = {
        "samples": (["--train-samples", "40", "--lr-warmup-samples", "12", "--lr-decay-samples", "36"], 8, 12, 36),
        "fraction": (["--train-iters", "10", "--lr-warmup-fraction", "0.25"], 1, 2.5, 10),
    }
    for name, (flags, unit, warmup, decay) in runs.items():
        metrics = tmp_path / f"{name}.jsonl"
        train(1, base + flags + ["--metrics-jsonl", str(metrics)])
        rows = read_metrics(metrics)
        assert [r["iteration"] for r in rows] == list(range(1, 6 if name == "samples" else 11)), name
        for r in rows:  # the lr of step i is the scheduler's after i - 1 steps
            expected = _megatron_lr((r["iteration"] - 1) * unit, warmup, decay)
            assert r["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), (name, r["iteration"])


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_exit_duration_saves_exits_zero_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """--exit-duration-in-mins 0.0001 (6 ms, passed once the first step is done): the run saves at step 1,
    exits 0 and leaves the stop marker the SLURM launcher requeues on; the resumed run's steps 2-4 are the
    uninterrupted run's."""
    from helpers.distributed_run import TINY_RUN, read_metrics, train

    def run(name, extra):
        metrics = tmp_path / f"{name}.jsonl"
        done = train(1, TINY_RUN + ["--train-iters", "4", "--metrics-jsonl", str(metrics), *extra])
        return {r["iteration"]: (r["lm_loss"], r["grad_norm"], r["lr"]) for r in read_metrics(metrics)}, done

    straight, _ = run("straight", [])
    ckpt = ["--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"), "--save-interval", "100"]
    first, done = run("first", ckpt + ["--exit-duration-in-mins", "0.0001"])
    assert done.returncode == 0 and sorted(first) == [1]
    assert "stop requested (--exit-duration-in-mins 0.0001 passed): saving at iteration 1" in done.stdout
    assert (tmp_path / "ckpt" / "stopped_by_signal").read_text() == "1"
    resumed, _ = run("resumed", ckpt)
    assert sorted(resumed) == [2, 3, 4] and all(resumed[i] == straight[i] for i in (2, 3, 4))
    assert first[1] == straight[1]


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_no_load_optim_resumes_the_weights_and_position_with_a_fresh_optimizer_and_schedule(tmp_path):
    """Megatron-LM's --no-load-optim: the iteration, weights and data go on (step 3's loss and gradient norm
    are the uninterrupted run's), the optimizer and the lr schedule start afresh (step 3 at the lr of step 1)."""
    from helpers.distributed_run import TINY_RUN, read_metrics, train

    def run(name, extra):
        metrics = tmp_path / f"{name}.jsonl"
        done = train(1, TINY_RUN + ["--train-iters", "4", "--metrics-jsonl", str(metrics), *extra])
        return {r["iteration"]: r for r in read_metrics(metrics)}, done

    straight, _ = run("straight", ["--save", str(tmp_path / "ckpt"), "--save-interval", "2"])
    resumed, done = run("resumed", ["--load", str(tmp_path / "ckpt"), "--ckpt-step", "2", "--no-load-optim"])
    assert "--no-load-optim: a fresh optimizer state and lr schedule" in done.stdout
    assert sorted(resumed) == [3, 4]
    assert (resumed[3]["lm_loss"], resumed[3]["grad_norm"]) == (straight[3]["lm_loss"], straight[3]["grad_norm"])
    assert resumed[3]["lr"] == straight[1]["lr"] and resumed[4]["lr"] == straight[2]["lr"] != straight[4]["lr"]


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_params_norm_is_the_checkpoints_norm_at_any_layout(tmp_path):
    """--log-params-norm at step 2, at TP 1 and TP 2: the L2 norm of the saved checkpoint's global tensors
    (each weight once, the tied output layer not again), read back without the model."""
    import torch
    from helpers.distributed_run import TINY_RUN, layout_flags, read_metrics, train

    from megatron_ext.release.dist_checkpoint_reader import DistCheckpointReader
    from megatron_ext.release.weight_mapping import megatron_global_shapes

    norms = {}
    for tp in (1, 2):
        metrics, ckpt = tmp_path / f"tp{tp}.jsonl", tmp_path / f"ckpt{tp}"
        flags = ["--train-iters", "2", "--log-params-norm", "--save", str(ckpt), "--metrics-jsonl", str(metrics)]
        done = train(tp, TINY_RUN + layout_flags(tp=tp) + flags)
        assert re.search(r"params norm \d+\.\d{4}", done.stdout)
        norms[tp] = [r["params_norm"] for r in read_metrics(metrics)]
        reader = DistCheckpointReader(str(ckpt))
        keys = [*megatron_global_shapes(reader.crystal), "embedding.word_embeddings.weight"]
        saved = torch.sqrt(sum(reader.read(k).double().pow(2).sum() for k in keys)).item()
        assert norms[tp][-1] == pytest.approx(saved, rel=1e-6), tp
    assert norms[1] == pytest.approx(norms[2], rel=1e-5) and norms[1][0] != norms[1][1]
