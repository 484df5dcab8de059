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

# What this machine refuses: a GPU's (bf16, nccl, FP8) and Transformer Engine's (--attention-backend fused).
MACHINE = {"--bf16", "--distributed-backend", "--fp8-format", "--grad-reduce-in-bf16", "--attention-backend"}


def _flags(script: str, tmp_path) -> list[list[str]]:
    """The script's flags, each with its values, paths pointed at this test's."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("0")
    values = {"CKPT": str(ckpt), "DATA": DEMO_PREFIX, "TB": str(tmp_path / "tb"), "CACHE": str(tmp_path / "cache")}
    flags: list[list[str]] = []
    for token in script.split():
        if token.startswith("--"):
            flags.append([token])
        else:
            flags[-1].append(values.get(token, token))
    return flags


def _verdict(argv: list[str]) -> str | None:
    try:
        check_command_line(argv, 1)
    except ArgumentError as e:
        return str(e)
    return None


@pytest.mark.parametrize("script", [LLM360_PHASE2, LLAMA3_8B_FP8], ids=["llm360_phase2", "llama3_8b_fp8"])
def test_each_flag_of_the_scripts_is_accepted_or_refused_with_its_reason(script, tmp_path):
    accepted, refused = [], []
    flags = _flags(script, tmp_path)
    given = {f[0]: f for f in flags}
    needs = {  # a flag alone is refused for what it needs beside it: given with it, as the script does
        "--exit-on-missing-checkpoint": ["--load"],
        "--save-interval": ["--save"],
        "--overlap-param-gather": ["--use-distributed-optimizer"],
        "--profile-step-start": ["--profile", "--profile-step-end"],
        "--profile-step-end": ["--profile", "--profile-step-start"],
    }
    for flag in flags:
        base = ["--model", "crystal-7b"] + ([] if flag[0] in ("--data-path", "--mock-data") else ["--mock-data"])
        base += [x for other in needs.get(flag[0], []) for x in given[other]]
        line = _verdict(base + flag)
        if line is None:
            accepted.append(flag[0])
            continue
        assert "unrecognized arguments" not in line and "invalid choice" not in line, line
        assert "\n" not in line and line.startswith(flag[0]), line  # the flag first, one line
        refused.append(flag[0])
    expected = {
        LLM360_PHASE2: {"--no-load-optim", "--no-load-rng", "--dataloader-type", "--log-params-norm"},
        LLAMA3_8B_FP8: {
            "--group-query-attention", "--num-query-groups", "--rotary-base", "--rotary-percent", "--init-method-std",
            "--apply-layernorm-1p", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
            "--train-samples", "--lr-decay-samples", "--lr-warmup-samples", "--decoupled-lr", "--decoupled-min-lr",
            "--manual-gc", "--empty-unused-memory-level", "--exit-duration-in-mins", "--fp8-param-gather",
        },
    }[script]  # fmt: skip
    assert set(refused) - MACHINE == expected, sorted(set(refused) - MACHINE)
    assert "--use-flash-attn" in accepted or "--use-mcore-models" in accepted


def test_llm360s_script_without_its_refusals_describes_crystal_7b(tmp_path):
    """Crystal in Megatron-LM's (and LLM360's muP) words is crystal-7b: accepted whole, with their meaning."""
    drop = {"--no-load-optim", "--no-load-rng", "--dataloader-type", "--log-params-norm"} | MACHINE
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
    ],
    ids=["preset", "mup", "cp", "ckpt", "fp16", "positions", "flash", "loss", "null_tokenizer"],
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
