"""Hugging Face release: convert_to_hf.py / convert_from_hf.py against the Megatron model they come from."""

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.distributed_run import REPO, TINY_RUN, layout_flags, read_metrics, train
from helpers.process_group import run_in_process_group

DEMO = REPO / "data" / "demo"
TOKENIZER = DEMO / "crystal_demo.model"
TOLERANCE = 1e-4


def run_tool(script, *args, timeout=300, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        **kwargs,
    )


def demo_run(tmp, extra):
    """crystal-test on the embedded corpus with its tokenizer (vocab 8032, padded 8064)."""
    assert TOKENIZER.is_file(), "the demo corpus is built by `make setup`"
    flags = [a for a in TINY_RUN if a != "--mock-data"]
    return flags + [
        "--data-path",
        str(DEMO / "text_text_document"),
        "--tokenizer-model",
        str(TOKENIZER),
        "--data-cache-path",
        str(tmp / "cache"),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 steps at TP 2 x PP 2 with the distributed optimizer: weights that are no longer the init."""
    tmp = tmp_path_factory.mktemp("trained")
    train(
        4, demo_run(tmp, layout_flags(tp=2, pp=2, dist_opt=True) + ["--train-iters", "3", "--save", str(tmp / "ckpt")])
    )
    return tmp / "ckpt"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "fp32"
    proc = run_tool("convert_to_hf.py", "--load", trained, "--output", out, "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _reported_delta(stdout):
    line = next(text for text in stdout.splitlines() if text.startswith("verify:"))
    return float(line.split("max |delta logits| ")[1].split()[0]), line


@pytest.mark.launch
@pytest.mark.slow
def test_export_layout_and_builtin_verify(exported):
    out, stdout = exported
    delta, line = _reported_delta(stdout)
    assert delta < TOLERANCE and "greedy continuations identical" in line, line
    files = set(os.listdir(out))
    assert {
        "config.json",
        "generation_config.json",
        "configuration_crystalcoder.py",
        "modeling_crystalcoder.py",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
    } <= files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(out / "model-00001-of-00001.safetensors")
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (64, 176)  # Conv1D: [in, out]
    wte = tensors["transformer.wte.weight"]
    assert wte.shape == (8032, 64) and wte.dtype == torch.float32  # Megatron's padding rows removed
    assert index["metadata"]["total_size"] == sum(4 * t.numel() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert not any(name.startswith("lm_head") for name in tensors)  # tied to wte


def _compare_tp2_megatron_with_hf(ckpt_dir, hf_dir, result_queue):
    """The Megatron model at TP 2 (each rank half the heads, FFN and vocab) against transformers' load."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from transformers import AutoModelForCausalLM

    from megatron_ext.checkpointing import load_model_weights
    from megatron_ext.model.crystal_gpt import ParallelLayout, build_model, transformer_config
    from megatron_ext.release.dist_checkpoint_reader import DistCheckpointReader
    from megatron_ext.release.parity import megatron_greedy

    reader = DistCheckpointReader(ckpt_dir)
    c = reader.crystal
    config = transformer_config(c, ParallelLayout(tensor_model_parallel_size=2), use_cpu_initialization=True)
    (model,) = build_model(c, config, reader.padded_vocab)
    load_model_weights(reader.path, [model])
    model.eval()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(123)
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        ids = torch.randint(0, c.vocab_size, (3, c.seq_length), generator=generator)
        positions = torch.arange(c.seq_length).expand_as(ids)
        expected = gather_from_tensor_model_parallel_region(model(ids, positions, None))[..., : c.vocab_size]
        got = hf(ids, use_cache=False).logits
        worst, scale = (got - expected).abs().max().item(), expected.abs().max().item()

        class TP2Logits:  # megatron_greedy's view of a model: (ids, positions, mask) -> full-vocab logits
            def __call__(self, ids, positions, mask):
                return gather_from_tensor_model_parallel_region(model(ids, positions, mask))

            def parameters(self):
                return model.parameters()

        prompt = ids[:1, :8]
        meg = megatron_greedy(TP2Logits(), prompt, c.vocab_size, 16)
        gen = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False, pad_token_id=2
        )[0].tolist()
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        result_queue.put((worst, scale, meg, gen))


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_transformers_load_matches_megatron_at_tp2(trained, exported):
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    os.environ["HF_HUB_OFFLINE"] = "1"
    run_in_process_group(
        _compare_tp2_megatron_with_hf, str(trained), str(exported[0]), queue, world_size=2, tp=2, timeout=240
    )
    worst, scale, meg, gen = queue.get()
    assert worst < TOLERANCE, f"max |delta logits| {worst}"
    assert scale > 0.1  # not a comparison of near-zero logits
    assert meg == gen and len(gen) > 8


@pytest.mark.launch
def test_tokenizer_files_encode_as_training_did(exported):
    from transformers import AutoTokenizer

    from megatron_ext.tokenizer import CRYSTAL_SPECIAL_TOKENS, CrystalTokenizer

    ours = CrystalTokenizer(str(TOKENIZER))
    hf = AutoTokenizer.from_pretrained(exported[0], trust_remote_code=True)  # as a user loads the export
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox.  Two  spaces\tand a tab.", "Ünïcödé 日本"]
    for text in texts + ["    return 1\n", " x", "\tindented", "\n\nafter blank lines"]:  # leading whitespace
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
        assert hf.decode(ours.encode(text)) == text
    assert hf.convert_tokens_to_ids(list(CRYSTAL_SPECIAL_TOKENS)) == list(range(8000, 8018))
    # Infilling: the prompt a user writes for the exported model is the one training's FIM format makes.
    from megatron_ext.data.fim import FimTokenIds, infilling_prompt

    for prefix, suffix in [("def f(x):\n    return ", " * 2\n"), ("  x = 3.14159", "\n\nprint(x)"), ("", " end")]:
        prompt = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
        ids = hf(prompt, add_special_tokens=False)["input_ids"]
        assert ids == infilling_prompt(ours, FimTokenIds.of(ours), prefix, suffix), prompt
        assert hf.decode(ids) == ours.decode(ids) == prompt
    # CodeGen2's sentinels (the demo tokenizer's, after Crystal's 18): exported with their ids and the
    # specials file beside tokenizer.model, and an infilling prompt in CodeGen2's layout encodes as the
    # parts would (the document's start with its dummy-prefix space, text after a special without).
    from megatron_ext.tokenizer import codegen2_sentinels, extra_special_tokens

    sentinels = list(codegen2_sentinels(8))
    assert list(extra_special_tokens(str(exported[0] / "tokenizer.model"))) == sentinels
    assert (
        hf.convert_tokens_to_ids(sentinels) == [ours.special_token_id(t) for t in sentinels] == list(range(8018, 8028))
    )
    prefix, suffix = "def f(x):\n    ", "\n    return y\n"
    ids = hf(f"{prefix}<mask_1>{suffix}</s><sep><mask_1>", add_special_tokens=False)["input_ids"]
    mask, sep = ours.special_token_id("<mask_1>"), ours.special_token_id("<sep>")
    assert ids == [*ours.encode(prefix), mask, *ours.encode_after_special(suffix), ours.eod, sep, mask]
    assert CrystalTokenizer(str(exported[0] / "tokenizer.model")).special_tokens == ours.special_tokens


@pytest.mark.launch
def test_bf16_export_verifies_and_stores_bf16(trained, tmp_path):
    out = tmp_path / "bf16"
    proc = run_tool("convert_to_hf.py", "--load", trained, "--output", out, "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _reported_delta(proc.stdout)[0] < TOLERANCE
    from safetensors import safe_open

    with safe_open(out / "model-00001-of-00001.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


@pytest.mark.launch
@pytest.mark.slow
def test_round_trip_is_bitwise_and_trains_at_tp2_pp2(trained, exported, tmp_path):
    """Megatron(TP2, PP2) -> HF -> Megatron(TP1, PP1) -> HF: the two HF directories hold the same bytes,
    and training from the imported checkpoint at TP2 x PP2 gives the original weights' losses."""
    first = exported[0]
    imported = tmp_path / "imported"
    proc = run_tool("convert_from_hf.py", "--input", first, "--save", imported)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The import's checkpoint is hashed as a training's is: every file listed with its sha256.
    (saved,) = imported.glob("iter_*")
    listed = json.loads((saved / "integrity.json").read_text())["files"]
    on_disk = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in saved.iterdir() if p.name != "integrity.json"
    }
    assert listed == on_disk and "common.pt" in listed
    second = tmp_path / "second"
    proc = run_tool("convert_to_hf.py", "--load", imported, "--output", second, "--dtype", "fp32", "--no-verify")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(first / "model-00001-of-00001.safetensors"), load_file(second / "model-00001-of-00001.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 + 4 * 14 + 1
    assert all(torch.equal(a[k], b[k]) for k in a)

    def two_steps(load, name, extra=()):
        metrics = tmp_path / f"{name}.jsonl"
        train(
            4,
            demo_run(
                tmp_path,
                layout_flags(tp=2, pp=2)
                + ["--train-iters", "2", "--load", str(load), "--metrics-jsonl", str(metrics), *extra],
            ),
        )
        return read_metrics(metrics)

    from_import = two_steps(imported, "imported")
    from_original = two_steps(trained, "original", ["--finetune"])
    for got, ref in zip(from_import, from_original, strict=True):
        assert got["lm_loss"] == pytest.approx(ref["lm_loss"], rel=1e-6), (got, ref)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), (got, ref)


def _save_with_megatron_core(hf_dir: str, out: str) -> None:
    """The import as Megatron-Core itself saves it: the model built, the weights placed, dist_checkpointing."""
    from megatron_ext.checkpointing import ModelState, checkpoint_metadata, save_checkpoint
    from megatron_ext.model.crystal_gpt import padded_vocab_size
    from megatron_ext.release import megatron_runtime
    from megatron_ext.release.hf_format import read_hf_config
    from megatron_ext.release.hf_weights import HFWeights
    from megatron_ext.release.weight_mapping import load_reference_weights

    cfg = read_hf_config(hf_dir)
    padded = padded_vocab_size(cfg.vocab_size, 128)
    model = megatron_runtime.build_model(cfg, padded, torch.device("cpu"))
    load_reference_weights([model], HFWeights(hf_dir, cfg), cfg, padded)
    tokenizer = {"type": "CrystalTokenizer", "model": os.path.abspath(os.path.join(hf_dir, "tokenizer.model"))}
    save_checkpoint(out, 0, {"model": ModelState([model])}, checkpoint_metadata(cfg, padded, tokenizer))


@pytest.mark.launch
def test_the_streamed_import_writes_what_megatron_core_saves(exported, tmp_path):
    """convert_from_hf.py writes tensor by tensor without building the model; its checkpoint has the index
    Megatron-Core's own save of the built model has (every key, global shape, dtype and chunk), the same
    tensors and the same common state. (Training from it: test_round_trip_is_bitwise_and_trains_at_tp2_pp2.)"""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_ext.release.dist_checkpoint_reader import DistCheckpointReader

    streamed, reference = tmp_path / "streamed", tmp_path / "reference"
    proc = run_tool("convert_from_hf.py", "--input", exported[0], "--save", streamed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_in_process_group(_save_with_megatron_core, str(exported[0]), str(reference))

    def index(root):
        entries = FileSystemReader(str(root / "iter_0000000")).read_metadata().state_dict_metadata
        return {
            key: (tuple(md.size), md.properties.dtype, sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks))
            if hasattr(md, "size") else type(md).__name__
            for key, md in entries.items()
        }  # fmt: skip

    assert index(streamed) == index(reference)
    got, want = DistCheckpointReader(str(streamed)), DistCheckpointReader(str(reference))
    pairs = list(zip(got.reference_tensors(), want.reference_tensors(), strict=True))
    assert len(pairs) == 2 + 4 * 14 + 1
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in pairs)
    common = [torch.load(root / "iter_0000000" / "common.pt", weights_only=False) for root in (streamed, reference)]
    assert common[0] == common[1]
    assert (streamed / "latest_checkpointed_iteration.txt").read_text() == "0"


def test_7b_config_and_weight_names_match_the_release(tmp_path):
    from megatron_ext.model import get_preset
    from megatron_ext.release import hf_export, hf_format

    cfg = get_preset("crystal-7b")
    hf_export.write_metadata_files(cfg, tmp_path)
    release = json.loads((REPO / "tests" / "data" / "crystalcoder-release-config.json").read_text())
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == release and list(written) == list(release)

    names = {
        hf_format.to_hf(n, torch.empty(0))[0]: hf_format.reference_shape(n, cfg) for n in hf_format.reference_names(cfg)
    }
    per_layer = [
        f"{m}.{k}"
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj")
        for k in ("weight", "bias")
    ]
    expected = {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"} | {
        f"transformer.h.{i}.{p}" for i in range(32) for p in per_layer
    }
    assert set(names) == expected
    total = sum(torch.Size(s).numel() for s in names.values())
    assert total == 6_575_278_720  # the release's unique parameters

    # The shipped modeling code, loaded as users load it and built for the 7B on the meta device, has
    # exactly these tensors, Conv1D ones as [in, out].
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (4096, 32, 32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    shapes = {hf_format.HF_PREFIX + r: hf_format.hf_shape(r, cfg) for r in hf_format.reference_names(cfg)}
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes


def _tool_main(script):
    spec = importlib.util.spec_from_file_location(script[:-3], REPO / "tools" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.launch
def test_bad_inputs_fail_with_one_line(trained, exported, tmp_path, capsys):
    """Each bad input is refused before any work (so the tools' main() runs in this process: no
    process group, no model is ever built)."""
    mains = {script: _tool_main(script) for script in ("convert_to_hf.py", "convert_from_hf.py")}

    def error(*args, script="convert_to_hf.py"):
        code = mains[script](list(map(str, args)))
        err = capsys.readouterr().err
        assert code == 2, err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1, err
        return lines[0]

    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    assert "no checkpoint" in error("--load", tmp_path / "empty", "--output", out)
    assert "no such directory" in error("--load", tmp_path / "nope", "--output", out)
    assert "no checkpoint of iteration 99 (found: iter_0000003)" in error(
        "--load", trained, "--ckpt-step", "99", "--output", out
    )
    assert "already exists and is not empty" in error("--load", trained, "--output", exported[0])
    fake = tmp_path / "fake"
    (fake / "iter_0000003").mkdir(parents=True)
    (fake / "latest_checkpointed_iteration.txt").write_text("3")
    assert "not a dist checkpoint (no metadata.json)" in error("--load", fake, "--output", out)
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(trained), str(broken)], check=True)
    victim = sorted((broken / "iter_0000003").glob("*.distcp"))[-1]
    victim.unlink()
    assert f"{victim} is missing (listed in integrity.json)" in error("--load", broken, "--output", out)
    assert not out.exists()

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    assert "model_type 'gpt2' is not 'crystalcoder'" in error(
        "--input", gpt2, "--save", out, script="convert_from_hf.py"
    )
    partial = tmp_path / "partial"
    subprocess.run(["cp", "-r", str(exported[0]), str(partial)], check=True)
    (partial / "model-00001-of-00001.safetensors").unlink()
    assert "which is missing" in error("--input", partial, "--save", out, script="convert_from_hf.py")
    assert "does not divide the 4 layers" in error(
        "--input", exported[0], "--save", out, "--pipeline-model-parallel-size", "3", script="convert_from_hf.py"
    )
    assert not out.exists()


@pytest.mark.launch
def test_killed_export_leaves_no_final_directory(trained, tmp_path):
    """SIGKILL after the weights are written (during --verify): the target never appears."""
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tools" / "convert_to_hf.py"),
            "--load",
            str(trained),
            "--output",
            str(out),
            "--dtype",
            "fp32",
            "--verify",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        for line in proc.stdout:
            if line.startswith("wrote "):
                break
        else:
            pytest.fail("the export never reported its weights")
        staged = list(tmp_path.glob(".killed.partial-*"))
        assert staged and (staged[0] / "model.safetensors.index.json").exists()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    time.sleep(0.1)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [staged[0].name]  # only the hidden partial remains


@pytest.mark.launch
@pytest.mark.slow
def test_export_of_an_earlier_iteration_without_distributed_optimizer(tmp_path):
    """PP 2 x DP 2 with the plain optimizer, saved at iterations 1 and 2: --ckpt-step 1 exports the
    first, verified, and its weights differ from the latest's (exported unverified: the other tests
    verify latest exports)."""
    ckpt = tmp_path / "ckpt"
    train(
        4, demo_run(tmp_path, layout_flags(pp=2) + ["--train-iters", "2", "--save", str(ckpt), "--save-interval", "1"])
    )
    outputs = {}
    for step in ("1", None):
        out = tmp_path / f"hf{step}"
        proc = run_tool(
            "convert_to_hf.py",
            "--load",
            ckpt,
            "--output",
            out,
            "--dtype",
            "fp32",
            *(["--ckpt-step", step] if step else ["--no-verify"]),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"(iteration {step or 2})" in proc.stdout
        if step:
            assert _reported_delta(proc.stdout)[0] < TOLERANCE
        from safetensors.torch import load_file

        outputs[step] = load_file(out / "model-00001-of-00001.safetensors")
    assert not torch.equal(
        outputs["1"]["transformer.h.0.attn.c_attn.weight"], outputs[None]["transformer.h.0.attn.c_attn.weight"]
    )


@pytest.mark.launch
@pytest.mark.slow
@pytest.mark.parametrize("single_file", ["model.safetensors", "pytorch_model.bin"])
def test_import_of_an_unsharded_directory(exported, single_file, tmp_path):
    """Most small and community checkpoints are one model.safetensors or pytorch_model.bin without an
    index: the same tensors as the sharded form, and convert_from_hf.py imports them."""
    from safetensors.torch import load_file, save_file

    from megatron_ext.release.hf_format import read_hf_config
    from megatron_ext.release.hf_weights import HFWeights

    sharded = exported[0]
    single = tmp_path / "single"
    subprocess.run(["cp", "-r", str(sharded), str(single)], check=True)
    (single / "model.safetensors.index.json").unlink()
    shard = single / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    shard.unlink()
    if single_file.endswith(".safetensors"):
        save_file(tensors, single / single_file)
    else:
        torch.save(tensors, single / single_file)
    cfg = read_hf_config(str(sharded))
    reference, got = HFWeights(str(sharded), cfg), HFWeights(str(single), cfg)
    assert list(got) == list(reference) and len(got) == len(tensors) == 2 + 4 * 14 + 1
    assert all(torch.equal(got[name], reference[name]) for name in reference)
    proc = run_tool("convert_from_hf.py", "--input", single, "--save", tmp_path / "imported")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "imported" / "latest_checkpointed_iteration.txt").read_text() == "0"
