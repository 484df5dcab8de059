"""The training loop: build, (resume,) step with Megatron-Core's pipeline schedules, log, evaluate, save."""

from __future__ import annotations

import argparse
import json
import os
from functools import partial

import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import cpu_compat
from megatron_ext.model.crystal_config import CrystalConfig
from megatron_ext.model.crystal_gpt import ParallelLayout, build_model, padded_vocab_size, transformer_config
from megatron_ext.training import arguments, checkpointing, data, distributed
from megatron_ext.training.metrics import TrainingLogger
from megatron_ext.training.optimizer import build_optimizer


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed token loss and token count; the schedule and finalize_model_grads divide by the global
    token count (calculate_per_token_loss)."""
    mask = loss_mask.reshape(-1).float()
    loss = (output_tensor.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), mask.sum()])}


def make_forward_step(device: torch.device):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens, labels, loss_mask, position_ids = (
            batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids")
        )
        output = model(tokens, position_ids, None, labels=labels)
        return output, partial(loss_func, loss_mask)

    return forward_step


def _reduce_loss(losses_reduced: list[dict]) -> float | None:
    """Global per-token loss on the last pipeline stage; None elsewhere."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([d["lm loss"] for d in losses_reduced]).sum(dim=0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1]).item()


class Trainer:
    def __init__(self, args: argparse.Namespace, crystal: CrystalConfig, device: torch.device):
        self.args, self.crystal, self.device = args, crystal, device
        layout = ParallelLayout(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            sequence_parallel=args.sequence_parallel,
        )
        self.config = transformer_config(
            crystal, layout, bf16=args.bf16, use_cpu_initialization=device.type == "cpu"
        )
        self.padded_vocab = padded_vocab_size(crystal.vocab_size, args.make_vocab_size_divisible_by)
        chunks = [c.to(device) for c in build_model(crystal, self.config, self.padded_vocab)]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer
        )
        self.model = [
            DistributedDataParallel(self.config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.optimizer, self.scheduler = build_optimizer(args, crystal, self.model)
        # gloo pairs point-to-point messages per peer in posting order. With PP=2 the previous and next
        # stage are one peer, and the batched exchange of the interleaved schedule would pair an
        # activation with a gradient; the unbatched path orders by rank parity and splits directions.
        self.config.batch_p2p_comm = args.distributed_backend != "gloo"
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [m.no_sync for m in self.model]
        self.config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        self.forward_backward = get_forward_backward_func()
        self.forward_step = make_forward_step(device)
        self.iteration, self.consumed_samples = 0, 0

    def data_iterators(self, dataset, consumed: int):
        """One micro-batch iterator per model chunk (the interleaved schedule draws from each)."""
        its = [data.micro_batches(dataset, consumed, self.args) for _ in self.model]
        return its if len(its) > 1 else its[0]

    def _run(self, iterators, forward_only: bool) -> list[dict]:
        return self.forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=iterators,
            model=self.model,
            num_microbatches=self.args.num_microbatches,
            seq_length=self.crystal.seq_length,
            micro_batch_size=self.args.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self, iterators) -> tuple[float | None, float | None]:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run(iterators, forward_only=False)
        update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        return _reduce_loss(losses), grad_norm

    @torch.no_grad()
    def evaluate(self, valid_dataset, eval_round: int) -> float | None:
        for m in self.model:
            m.eval()
        consumed = eval_round * self.args.eval_iters * self.args.global_batch_size
        its = self.data_iterators(valid_dataset, consumed)
        losses = []
        for _ in range(self.args.eval_iters):
            losses.extend(self._run(its, forward_only=True))
        for m in self.model:
            m.train()
        return _reduce_loss(losses)

    def current_lr(self) -> float:
        return next(g["lr"] for g in self.optimizer.param_groups if g.get("default_config", True))

    def save(self) -> None:
        tokenizer = None
        if self.args.tokenizer_model:
            tokenizer = {"type": self.args.tokenizer_type, "model": os.path.abspath(self.args.tokenizer_model)}
        path = checkpointing.save_checkpoint(
            self.args.save, self.iteration, self.model, self.crystal, self.padded_vocab, self.optimizer,
            self.scheduler, self.consumed_samples, tokenizer,
        )
        distributed.print_rank_0(f"saved checkpoint {path}")

    def load(self) -> None:
        self.iteration, self.consumed_samples = checkpointing.load_checkpoint(
            self.args.load, self.model, self.optimizer, self.scheduler, self.crystal, self.padded_vocab,
            step=self.args.ckpt_step, weights_only=self.args.finetune,
        )
        if self.iteration:
            distributed.print_rank_0(f"resumed from {self.args.load} at iteration {self.iteration}")
        elif checkpointing.checkpoint_path(self.args.load, self.args.ckpt_step) is None:
            distributed.print_rank_0(f"{self.args.load} holds no checkpoint: starting fresh")
        else:
            distributed.print_rank_0(f"took the weights of {self.args.load}: iteration 0, fresh optimizer and schedule")


def _describe_path(args: argparse.Namespace) -> str:
    device = "CPU (Megatron-Core CPU compatibility layer)" if cpu_compat.is_active() else torch.cuda.get_device_name()
    return (
        f"kernel path: Megatron-Core local spec (no Transformer Engine), unfused attention and rope; "
        f"device: {device}; backend: {args.distributed_backend}; "
        f"precision: {'bf16' if args.bf16 else 'fp32'}"
    )


def pretrain(args: argparse.Namespace, crystal: CrystalConfig) -> int:
    """Train with arguments already checked by arguments.validate."""
    device = distributed.initialize(args)
    try:
        return _train(args, crystal, device)
    except checkpointing.CheckpointError as e:
        distributed.print_rank_0(f"pretrain_crystal.py: error: {e}")
        return 2
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace, crystal: CrystalConfig, device: torch.device) -> int:
    trainer = Trainer(args, crystal, device)
    distributed.print_rank_0(
        f"model {args.model}: {crystal.num_parameters():,} parameters | TP {args.tensor_model_parallel_size} "
        f"PP {args.pipeline_model_parallel_size} VP {args.virtual_pipeline_model_parallel_size or 1} "
        f"DP {args.data_parallel_size} SP {args.sequence_parallel} dist-opt {args.use_distributed_optimizer} | "
        f"{args.num_microbatches} micro-batches of {args.micro_batch_size} per step"
    )
    distributed.print_rank_0(_describe_path(args))
    if args.load:
        trainer.load()
    train_ds, valid_ds = data.build_datasets(args, crystal)
    train_its = trainer.data_iterators(train_ds, trainer.consumed_samples)

    logging_rank = distributed.is_logging_rank()
    writer = None
    if logging_rank and args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard_dir)
    logger = TrainingLogger(args, crystal, trainer.padded_vocab, torch.distributed.get_world_size(), writer)
    metrics_file = open(args.metrics_jsonl, "a") if logging_rank and args.metrics_jsonl else None

    while trainer.iteration < args.train_iters:
        lr = trainer.current_lr()
        loss, grad_norm = trainer.train_step(train_its)
        trainer.iteration += 1
        trainer.consumed_samples += args.global_batch_size
        if logging_rank:
            line = logger.step(trainer.iteration, loss, lr, grad_norm)
            if line:
                print(line, flush=True)
            if metrics_file:
                metrics_file.write(json.dumps(
                    {"iteration": trainer.iteration, "lm_loss": loss, "grad_norm": grad_norm, "lr": lr}) + "\n")
                metrics_file.flush()
        if args.eval_interval and trainer.iteration % args.eval_interval == 0:
            valid_loss = trainer.evaluate(valid_ds, trainer.iteration // args.eval_interval - 1)
            if logging_rank:
                print(f"validation at iteration {trainer.iteration} | lm loss {valid_loss:.6f}", flush=True)
                if writer:
                    writer.add_scalar("validation lm loss", valid_loss, trainer.iteration)
        if args.save and args.save_interval and trainer.iteration % args.save_interval == 0:
            trainer.save()
        if args.exit_interval and trainer.iteration % args.exit_interval == 0:
            break
    if args.save and not (args.save_interval and trainer.iteration % args.save_interval == 0):
        trainer.save()
    if writer:
        writer.close()
    if metrics_file:
        metrics_file.close()
    return 0
