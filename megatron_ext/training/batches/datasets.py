"""Training and validation data through Megatron-Core's GPTDataset and BlendedMegatronDatasetBuilder.

The sample order is Megatron's: global batch i holds samples [i*G, (i+1)*G) of the dataset, and
micro-batch m of data-parallel rank d holds [i*G + m*B*D + d*B, ... + B) (B micro batch, D DP size).
The set of samples in a step is therefore the same for every layout, and resuming needs nothing but
the number of samples consumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_ext.tokenizer import EOD_ID
from megatron_ext.training.run_config import RunConfig


@dataclass(frozen=True)
class DatasetTokenizerInfo:
    """What GPTDataset needs to know of the tokenizer (vocabulary size, end-of-document id) when no
    --tokenizer-model is given (mock data, or a corpus tokenised with Crystal's ids)."""

    vocab_size: int
    eod: int = EOD_ID

    @property
    def unique_identifiers(self) -> dict:
        # Part of the hash that names Megatron-Core's cached sample indices.
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


def build_datasets(run: RunConfig, built_here: bool):
    """Returns (train, valid) GPTDatasets sized for the whole run; (None, None) where not built_here.
    Every rank calls it: Megatron-Core's builder holds the others at a barrier while rank 0 builds."""
    opt, evaluation, data = run.optimizer, run.eval, run.data
    train_samples = opt.train_iters * opt.global_batch_size
    eval_runs = opt.train_iters // evaluation.eval_interval + 1 if evaluation.eval_interval else 0
    valid_samples = eval_runs * evaluation.eval_iters * opt.global_batch_size
    config = GPTDatasetConfig(
        random_seed=opt.seed,
        sequence_length=run.crystal.seq_length,
        blend=data.blend,
        split=data.split,
        path_to_cache=data.data_cache_path,
        tokenizer=data.tokenizer or DatasetTokenizerInfo(vocab_size=run.crystal.vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    cls = MockGPTDataset if data.mock_data else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(
        cls, [train_samples, valid_samples, 0], lambda: built_here, config
    ).build()
    return train, valid


class MicroBatchSampler(torch.utils.data.Sampler):
    """Yields this data-parallel rank's micro-batches of sample indices, starting after `consumed`."""

    def __init__(self, total_samples: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total, self.consumed = total_samples, consumed
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self):
        stride = self.mbs * self.dp_size
        for start in range(self.consumed, self.total - stride + 1, stride):
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))

    def __len__(self):
        return (self.total - self.consumed) // (self.mbs * self.dp_size)


def micro_batches(dataset, consumed_samples: int, run: RunConfig, num_workers: int | None = None) -> Iterator[dict]:
    """This rank's micro-batches from sample `consumed_samples` on (empty without a dataset); num_workers:
    DataLoader workers (default --num-workers)."""
    if dataset is None or len(dataset) == 0:
        return iter(())
    sampler = _rank_sampler(dataset, consumed_samples, run)
    return _load(dataset, sampler, run.data.num_workers if num_workers is None else num_workers)


def positions_only(dataset, run: RunConfig) -> Iterator[dict]:
    """This rank's micro-batches of a packed evaluation set as a chunk between the first and the last
    pipeline stage needs them: the position ids alone (the set is on every rank; rows are cheap to build)."""
    for indices in _rank_sampler(dataset, 0, run):
        yield {"position_ids": torch.stack([dataset[i]["position_ids"] for i in indices])}


def _rank_sampler(dataset, consumed_samples: int, run: RunConfig) -> MicroBatchSampler:
    return MicroBatchSampler(
        len(dataset),
        consumed_samples,
        run.layout.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )


def _load(dataset, batch_sampler, num_workers: int) -> Iterator[dict]:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
    return iter(loader)


def build_phased_datasets(run: RunConfig):
    """(train, valid) PhasedDatasets of the --phases file; valid is None without held-out documents."""
    from megatron_ext.data.phased_dataset import PhasedDataset

    config, tokenizer, seq_length = run.data.phases_config, run.data.tokenizer, run.crystal.seq_length
    cache = run.data.index_cache_dir
    train = PhasedDataset(config, seq_length, tokenizer, cache_dir=cache)
    train.check_epochs(run.optimizer.train_iters)
    valid = PhasedDataset(config, seq_length, tokenizer, "valid", cache) if config.validation_fraction else None
    return train, valid


def phased_micro_batches(dataset, schedule, steps: int, run: RunConfig) -> Iterator[dict]:
    """This rank's micro-batches for `steps` steps, walking a copy of the phase schedule."""
    from megatron_ext.data.phased_dataset import PhaseBatchSampler

    sampler = PhaseBatchSampler(
        schedule,
        run.layout.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        steps,
    )
    return _load(dataset, sampler, run.data.num_workers)
