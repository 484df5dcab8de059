"""The loop's side work in this process, with a fake trainer: the metrics stream and its sinks (the log line,
--metrics-jsonl, TensorBoard, eval_results.jsonl), evaluation, checkpoint saving; and both data feeds (a
blend's and the phases') on a one-rank gloo group, resumed from their state."""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
from helpers.distributed_run import REPO, free_port

from megatron_ext.evaluation.eval_set import Figure
from megatron_ext.training import callbacks, metrics
from megatron_ext.training.arguments import build_parser, validate
from megatron_ext.training.callbacks import StepResult
from megatron_ext.training.metric_sinks import ConsoleSink, EvalResultsSink, JsonlSink, Sink, TensorBoardSink

TOKENIZER = str(REPO / "data" / "demo" / "crystal_demo.model")
PHASES = str(REPO / "tests" / "data" / "phases_small.yaml")


def _run(*flags):
    return validate(build_parser().parse_args(["--model", "crystal-test", "--num-workers", "0", *flags]), 1)


class Recording(Sink):
    """What the sinks receive: every step's values and context, every evaluation's figures."""

    def __init__(self):
        self.steps, self.figures = [], []

    def write_step(self, step, values, context):
        self.steps.append((step, dict(values), dict(context)))

    def write_figures(self, step, figures, context):
        self.figures.append((step, list(figures), dict(context)))


class FakeFeed:
    def __init__(self):
        self.consumed_samples = 0

    def scalars(self):
        return {"data/phase": 0.0}

    def validation_set(self):
        return SimpleNamespace(num_slots=4)

    def bookkeeping_json(self, iteration):
        return json.dumps({"iteration": iteration, "consumed_samples": self.consumed_samples})


class FakeTrainer:
    """What the callbacks use of a Trainer: the feed, the guard, the timers, save() (telling them), evaluate()."""

    def __init__(self, save_dir=None):
        self.feed, self.padded_vocab, self.iteration = FakeFeed(), 128, 0
        self.guard = SimpleNamespace(consecutive=0, total=0, exhausted=False)
        self.save_dir, self.saved, self.callbacks, self.timers = save_dir, [], [], None

    def save(self, side_files=None):
        path = os.path.join(self.save_dir, f"iter_{self.iteration:07d}")
        os.makedirs(path)
        for name, text in (side_files or {}).items():
            open(os.path.join(path, name), "w").write(text)
        self.saved.append(self.iteration)
        for callback in self.callbacks:
            callback.post_checkpoint_saved(self, path)
        return 0.25

    def evaluate(self, evaluation):
        return [Figure("valid/text", "bpb", 1.5, 32, 0.1), Figure("valid/text", "loss", 2.0, 32, None)]


class FakeSaver:
    """What CheckpointCallback asks of the CheckpointSaver, recorded."""

    def __init__(self):
        self.calls = []

    def poll(self):
        self.calls.append("poll")

    def wait(self):
        self.calls.append("wait")

    def close(self, abort=False):
        self.calls.append("abort" if abort else "close")


@pytest.fixture
def clock(monkeypatch):
    """The throughput meter's clock, set by the test."""
    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 1)
    return now


def test_one_stream_reaches_every_sink(tmp_path, clock, capsys):
    """Four steps at --log-interval 2: the console prints steps 2 and 4 (the loss averaged over the window,
    per source over its tokens), a skipped update's line; the JSON lines and TensorBoard get every step;
    a save's 2.5 s between steps 1 and 2 stays out of the step time."""
    run = _run("--mock-data", "--log-interval", "2", "--train-iters", "4")
    recording = Recording()
    sinks = [ConsoleSink(4, run.crystal.seq_length, fp8=False), JsonlSink(str(tmp_path / "m.jsonl")), recording]
    sinks.append(TensorBoardSink(str(tmp_path / "tb")))
    stream = metrics.Metrics(sinks)
    trainer = FakeTrainer()
    cb = callbacks.MetricsCallback(run, trainer, stream, logging_rank=True)
    steps = [
        StepResult(1, 5.0, 1e-3, 0.5, None, 8, "p1", {"text": (8.0, 2.0), "code": (0.0, 0.0)}, 11),
        StepResult(2, 4.0, 1e-3, 0.5, None, 8, "p1", {"text": (3.0, 1.0), "code": (6.0, 2.0)}, 12),
        StepResult(3, 5.0, 1e-3, None, "non-finite gradients", 8, "p1", {"text": (5.0, 1.0)}, 13),
        StepResult(4, 3.0, 1e-3, 0.5, None, 8, "p1", {"text": (3.0, 1.0)}, 14),
    ]
    for step, end in zip(steps, (0.1, 2.7, 2.8, 2.9)):  # a 2.5 s save after step 1
        clock[0] = end
        trainer.feed.consumed_samples += 8
        if step.skipped:
            trainer.guard.consecutive = trainer.guard.total = 1
        cb.post_step(trainer, step)
        if step.iteration == 1:
            stream.record(metrics.SIDE_WORK, 2.5, reduce="sum")
    cb.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "iteration       2/4 | phase p1 | consumed tokens 512 | lm loss 4.500000 | by source text 3.6667 code 3.0000"
        " | lr 1.0000e-03 | grad norm 0.5000 | tokens/s 2,560 | step time 100.0 ms | ETA 0:00:00"
    )
    assert lines[1] == "iteration 3: non-finite gradients (lm loss 5.0): update skipped (1 in a row, 1 in all)"
    assert lines[2].startswith("iteration       4/4 | phase p1 | consumed tokens 1,024 | lm loss 4.000000 | by source")
    assert "by source text 4.0000 | lr" in lines[2] and "step time 100.0 ms" in lines[2] and len(lines) == 3
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert records[0] == {
        "iteration": 1, "lm_loss": 5.0, "grad_norm": 0.5, "lr": 1e-3, "phase": "p1", "source_losses": {"text": 4.0},
        "source_tokens": {"text": 2}, "data_hash": 11,
    }  # fmt: skip
    assert records[2]["grad_norm"] is None and records[1]["source_losses"] == {"text": 3.0, "code": 3.0}
    # Every sink saw the same stream: the throughput and the feed's scalars at the log steps only.
    assert [s for s, values, _ in recording.steps if "tokens-per-second" in values] == [2, 4]
    step2 = recording.steps[1][1]
    assert step2["step-time-ms"] == pytest.approx(100.0) and step2["tokens-per-second"] == pytest.approx(2560.0)
    assert step2["consumed-tokens"] == 512 and step2["data/phase"] == 0.0 and step2[metrics.SIDE_WORK] == 2.5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.value for e in events.Scalars("lm loss")] == [5.0, 4.0, 5.0, 3.0]
    assert [e.step for e in events.Scalars("step-time-ms")] == [2, 4]
    assert [e.value for e in events.Scalars("lm loss by source/code")] == [3.0]


def test_wandb_offline_run_holds_the_tensorboard_scalars(tmp_path, clock, monkeypatch):
    """--wandb-project with WANDB_MODE=offline: the run directory under --wandb-save-dir holds every scalar
    TensorBoard gets, at the same steps with the same values (training steps and evaluation figures), and
    the run's configuration."""
    from helpers.wandb_records import run_history, run_identity, scalar_series
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_ext.training.metric_sinks import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _run("--mock-data", "--log-interval", "2", "--train-iters", "4", "--wandb-project", "p", "--save",
               str(tmp_path / "job" / "ckpt"), "--wandb-entity", "team")  # fmt: skip
    log = run.logging
    assert (log.wandb_exp_name, log.wandb_save_dir) == ("job", str(tmp_path / "job" / "ckpt" / "wandb"))
    wandb_sink = WandbSink(log.wandb_project, log.wandb_exp_name, str(tmp_path / "wb"), json.loads(run.to_json()),
                           entity=log.wandb_entity)  # fmt: skip
    stream = metrics.Metrics([TensorBoardSink(str(tmp_path / "tb")), wandb_sink])
    trainer = FakeTrainer()
    cb = callbacks.MetricsCallback(run, trainer, stream, logging_rank=True)
    for it, loss in enumerate((5.0, 4.0, 3.5, 3.0), start=1):
        clock[0] = 0.1 * it
        trainer.feed.consumed_samples += 8
        cb.post_step(trainer, StepResult(it, loss, 1e-3, 0.5, None, 8, None, {"text": (loss, 1.0)}, 7))
        if it == 2:
            stream.log_figures(2, trainer.evaluate(None), {"seconds": 0.5})
    cb.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    tensorboard = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    logged = scalar_series(str(tmp_path / "wb"))
    assert set(logged) == set(tensorboard) and {"lm loss", "eval/valid/text/bpb", "step-time-ms"} <= set(logged)
    for name, points in tensorboard.items():
        assert [step for step, _ in logged[name]] == [step for step, _ in points], name
        assert [v for _, v in logged[name]] == pytest.approx([v for _, v in points], rel=1e-6), name
    assert logged["lm loss"] == [(1, 5.0), (2, 4.0), (3, 3.5), (4, 3.0)] and logged["eval/valid/text/bpb"] == [(2, 1.5)]
    assert len(run_history(str(tmp_path / "wb"))) == 4  # one row per step, the figures in step 2's
    assert run_identity(str(tmp_path / "wb")) == {"project": "p", "entity": "team", "name": "job"}


def test_gpu_memory_reaches_the_log_line_always_and_tensorboard_with_its_flag(tmp_path, monkeypatch, capsys):
    """On a GPU the logging rank's allocated / reserved / peak memory (torch.cuda's allocator, faked here)
    is on the log line; TensorBoard gets memory/<name> with --log-memory-to-tensorboard only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_ext.training import memory_report

    gib = 1024**3
    monkeypatch.setattr(memory_report.cpu_compat, "is_active", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 41.25 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 44 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 52.3 * gib)
    values = {"lm loss": 4.0, "learning-rate": 1e-3, "consumed-tokens": 64, "tokens-per-second": 1.0,
              "step-time-ms": 1.0, "eta-seconds": 0.0, **memory_report.measured()}  # fmt: skip
    ConsoleSink(1, 32, fp8=False).write_step(1, values, {})
    assert capsys.readouterr().out.rstrip().endswith("| memory (GiB) allocated 41.2 | reserved 44.0 | peak 52.3")
    for flag in (False, True):
        sink = TensorBoardSink(str(tmp_path / str(flag)), memory=flag)
        sink.write_step(1, values, {})
        sink.close()
        tags = EventAccumulator(str(tmp_path / str(flag))).Reload().Tags()["scalars"]
        memory_tags = {"memory/allocated-gib", "memory/reserved-gib", "memory/peak-allocated-gib"}
        assert (memory_tags <= set(tags)) is flag and "lm loss" in tags


def test_wandb_flags_fail_in_one_line(monkeypatch):
    import importlib.util

    from megatron_ext.training.run_config import ArgumentError

    for flag in ("--wandb-exp-name", "--wandb-entity"):
        with pytest.raises(ArgumentError, match="^--wandb-exp-name, --wandb-save-dir and --wandb-entity need --wandb"):
            _run("--mock-data", flag, "x")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ArgumentError, match=r"^--wandb-project needs the wandb package: pip install 'crystal-megatron"):
        _run("--mock-data", "--wandb-project", "p")


@pytest.mark.parametrize("fp8", [False, True])
def test_log_line_on_a_gpu(monkeypatch, clock, capsys, fp8):
    """TFLOP/s per GPU from the Megatron-LM FLOP count, MFU against the peak of the GEMMs' precision."""
    from megatron_ext.kernels.selection import Probes, select

    h100 = "NVIDIA H100 80GB HBM3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: h100)
    path = select(
        fp8_format="hybrid" if fp8 else None, probes=Probes(gpu_name=h100, compute_capability=(9, 0), triton=True)
    )
    model = SimpleNamespace(hidden_size=64, ffn_hidden_size=128, num_layers=2, seq_length=32)
    meter = metrics.Throughput(model, padded_vocab=256, world_size=2, train_iters=4, fp8=path.fp8 is not None)
    meter.step(256, 0.0)
    meter.step(256, 0.0)
    clock[0] = 2e-6  # 2 steps in 2 us
    values = {"lm loss": 4.0, "learning-rate": 1e-3, "consumed-tokens": 512, **meter.figures(2)}
    ConsoleSink(4, 32, fp8=path.fp8 is not None).write_step(2, values, {})
    line = capsys.readouterr().out
    # Per token: 3 x (2 layers x (2 (4 h^2 + 3 h f) + 4 s h) + 2 h V) = 638,976 FLOPs; 2 x 8 x 32 tokens in
    # 2 us over 2 GPUs: 81.79 TFLOP/s each; of 989 (bf16) or 1979 (fp8) TFLOP/s.
    tflops = 512 / 2e-6 * 638976 / 2 / 1e12
    assert f"TFLOP/s/GPU {tflops:.1f}" in line
    mfu = re.search(r"MFU ([\d.]+)% \((\w+) peak(?:; ([\d.]+)% of bf16 peak)?\)", line)
    assert mfu.group(2) == ("fp8" if fp8 else "bf16")
    assert float(mfu.group(1)) == pytest.approx(100 * tflops / (1979.0 if fp8 else 989.0), abs=0.05)
    if fp8:  # the bf16-peak figure beside it, as peers quote FP8 runs
        assert float(mfu.group(3)) == pytest.approx(100 * tflops / 989.0, abs=0.05)
    assert values["tflops-per-gpu"] == pytest.approx(tflops)  # TensorBoard gets the same figures
    assert values["mfu-percent"] == pytest.approx(float(mfu.group(1)), abs=0.05)


def test_evaluation_logs_figures_once_to_every_sink(tmp_path, capsys):
    run = _run("--mock-data", "--eval-interval", "2", "--eval-iters", "1")
    recording = Recording()
    stream = metrics.Metrics([ConsoleSink(100, 32, False), EvalResultsSink(str(tmp_path / "e.jsonl"), "r"), recording])
    trainer = FakeTrainer()
    cb = callbacks.EvaluationCallback(run, stream)
    trainer.feed.consumed_samples = 16
    for it in (1, 2):
        cb.post_step(trainer, StepResult(it, 4.0, 1e-3, 0.5, None, 8, None, None, None))
    (step, figures, context), = recording.figures  # fmt: skip
    assert step == 2 and [f.metric for f in figures] == ["bpb", "loss"] and context["tokens"] == 16 * 32
    assert stream.values[metrics.SIDE_WORK] == context["seconds"]  # kept out of the next window's step time
    out = capsys.readouterr().out
    assert out.startswith("validation at iteration 2 | valid/text bpb 1.5000 loss 2.0000 | ")
    records = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [list(r) for r in records][0] == [
        "run", "phase", "phase_start_tokens", "iteration", "tokens", "checkpoint", "task", "metric", "value", "n",
        "stderr",
    ]  # fmt: skip
    assert [(r["iteration"], r["task"], r["metric"], r["value"], r["n"]) for r in records] == [
        (2, "valid/text", "bpb", 1.5, 32),
        (2, "valid/text", "loss", 2.0, 32),
    ]


def test_validation_ppl_is_exp_of_each_validation_loss(tmp_path, capsys):
    import math

    run = _run("--mock-data", "--eval-interval", "1", "--eval-iters", "1", "--log-validation-ppl-to-tensorboard")
    recording = Recording()
    cb = callbacks.EvaluationCallback(run, metrics.Metrics([recording]))
    cb.post_step(FakeTrainer(), StepResult(1, 4.0, 1e-3, 0.5, None, 8, None, None, None))
    ((_, figures, _),) = recording.figures
    assert [(f.task, f.metric) for f in figures][-1] == ("valid/text", "ppl")
    assert figures[-1].value == pytest.approx(math.exp(2.0)) and figures[-1].n == 32


def test_eval_iters_0_turns_validation_off_as_in_megatron_lm(tmp_path, capsys):
    """--eval-iters 0: no held-out set is built or scored; with no tasks, an evaluation step does nothing."""
    run = _run("--mock-data", "--eval-interval", "2", "--eval-iters", "0")
    recording = Recording()
    trainer = FakeTrainer()
    trainer.feed.validation_set = lambda: pytest.fail("--eval-iters 0 built the validation set")
    cb = callbacks.EvaluationCallback(run, metrics.Metrics([ConsoleSink(100, 32, False), recording]))
    for it in (1, 2, 4):
        cb.post_step(trainer, StepResult(it, 4.0, 1e-3, 0.5, None, 8, None, None, None))
    assert recording.figures == [] and capsys.readouterr().out == ""
    assert cb.sets(trainer) == []
    small, tokenizer = REPO / "tests" / "data" / "phases_small.yaml", REPO / "data" / "demo" / "crystal_demo.model"
    phased = _run(
        "--phases", str(small), "--tokenizer-model", str(tokenizer), "--eval-interval", "2", "--eval-iters", "0"
    )
    assert not phased.eval.validates


def test_manual_gc_collects_at_its_steps_and_close_turns_automatic_collection_back_on(monkeypatch, one_rank):
    import gc

    collected = []
    monkeypatch.setattr(gc, "collect", lambda: collected.append(True) or 0)
    run = _run("--mock-data", "--manual-gc", "--manual-gc-interval", "3", "--eval-interval", "4")
    cb = callbacks.GarbageCollectionCallback(run)
    try:
        assert not gc.isenabled() and len(collected) == 1  # off, after one collection at the start
        steps = []
        for it in range(1, 13):
            before = len(collected)
            cb.post_step(FakeTrainer(), StepResult(it, 4.0, 1e-3, 0.5, None, 8, None, None, None))
            steps += [it] * (len(collected) - before)
        assert steps == [3, 4, 6, 8, 9, 12]  # every 3 steps, and after each evaluation (every 4)
    finally:
        cb.close()
    assert gc.isenabled()
    no_eval = callbacks.GarbageCollectionCallback(_run("--mock-data", "--manual-gc", "--no-manual-gc-eval"))
    no_eval.close()
    assert no_eval.interval == 0 and no_eval.eval_interval == 0


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo group with Megatron's parallel state, in this process."""
    from megatron_ext.training import distributed

    rendezvous = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    before = {name: os.environ.get(name) for name in rendezvous}
    os.environ.update(rendezvous)
    try:
        distributed.initialize(_run("--mock-data"))
        yield
        distributed.shutdown()
    finally:  # the processes later tests start must not inherit this group's rendezvous
        for name, value in before.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def test_checkpoints_at_the_interval_and_the_end_with_their_data_state(tmp_path, one_rank):
    run = _run("--mock-data", "--save", str(tmp_path), "--save-interval", "2")
    trainer = FakeTrainer(str(tmp_path))
    stream = metrics.Metrics()
    saver = FakeSaver()
    trainer.callbacks = [callbacks.CheckpointCallback(run.checkpoint, stream, saver)]
    for it in (1, 2, 3):
        trainer.iteration, trainer.feed.consumed_samples = it, 8 * it
        trainer.callbacks[0].post_step(trainer, StepResult(it, 4.0, 1e-3, 0.5, None, 8, None, None, None))
    assert trainer.saved == [2] and stream.values[metrics.SIDE_WORK] == 0.25
    # data_state.json is what the run had read when the save began, whenever its write completes
    trainer.feed.consumed_samples = 99
    assert json.loads((tmp_path / "iter_0000002" / "data_state.json").read_text())["consumed_samples"] == 16
    trainer.callbacks[0].post_train(trainer, stopped_by_signal=True)
    assert trainer.saved == [2, 3]
    assert json.loads((tmp_path / "iter_0000003" / "data_state.json").read_text())["consumed_samples"] == 99
    assert (tmp_path / callbacks.STOP_MARKER).read_text() == "3"
    # A background write is completed after each step and waited for at the end; an error stops it.
    trainer.callbacks[0].on_error(trainer, RuntimeError())
    assert saver.calls == ["poll", "poll", "poll", "wait", "abort"]


def _take(run, feed, steps):
    """The tokens of the next `steps` steps, advancing the feed as the loop does."""
    out = []
    batches = feed.train_batches(steps)
    for _ in range(steps):
        micro = run.layout.num_microbatches(feed.step_batch_size())
        out.append(torch.cat([next(batches)["tokens"] for _ in range(micro)]))
        feed.advance()
    return out


@pytest.mark.parametrize("kind", ["blend", "phases"])
def test_feeds_resume_the_same_stream_from_their_state(kind, one_rank):
    """Each feed is a DataFeed; after 5 steps (with phases, across the switch at step 4) its state, loaded
    into a fresh feed, gives the same next steps as going on."""
    from megatron_ext.training.batches import feeds

    flags = ["--mock-data"] if kind == "blend" else ["--phases", PHASES, "--tokenizer-model", TOKENIZER]
    run = _run(*flags, "--seq-length", "32", "--train-iters", "8")
    feed = feeds.build(run)
    assert isinstance(feed, feeds.DataFeed) and type(feed).__name__ == ("BlendFeed" if kind == "blend" else "PhaseFeed")
    first = _take(run, feed, 5)
    state = feed.state_dict()
    assert state["consumed_samples"] == 40
    if kind == "phases":
        assert feed.phase_name == "text+code" and feed.source_names == ["text", "code"]
        assert json.loads(feed.bookkeeping_json(5))["consumed_samples"] == 40
    going_on = _take(run, feed, 3)
    resumed = feeds.build(run)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint's common state holds it
    assert resumed.consumed_samples == 40 and resumed.resume_note is None
    again = _take(run, resumed, 3)
    assert all(torch.equal(a, b) for a, b in zip(going_on, again)) and len(again) == 3
    assert not any(torch.equal(a, b) for a, b in zip(first[:3], going_on))  # it did move on
