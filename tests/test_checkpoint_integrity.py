"""Checkpoint integrity (checkpoint_integrity.py): every file of a checkpoint is listed with its SHA-256 before the
tracker names it; a resume, an evaluation and an export hash it again first; a changed byte in a shard, in
common.pt or in the DCP metadata is named and the previous checkpoint is used; --no-verify-integrity turns both off;
checkpoints saved before manifests load, said to be unverified."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
from helpers.distributed_run import REPO, TINY_RUN, read_metrics, subprocess_environment, train

from megatron_ext import checkpoint_integrity
from megatron_ext.checkpoint_files import checkpoint_path, damage_reason
from megatron_ext.evaluation import checkpoint_model
from megatron_ext.evaluation.checkpoint_model import CheckpointLoadError

RUN = TINY_RUN + ["--train-iters", "8", "--use-distributed-optimizer"]
SAVES = ["--save-interval", "2", "--exit-interval", "6"]


def _metrics(path):
    return {r["iteration"]: (r["lm_loss"], r["grad_norm"], r["lr"]) for r in read_metrics(path)}


def flip_one_byte(path, where: float = 0.5) -> None:
    """One byte of the file changed in place, at a fraction of its length (its size and name unchanged)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints of iterations 2, 4, 6 of a 2-rank run, and the metrics of the same run carried on to step 8."""
    tmp = tmp_path_factory.mktemp("integrity")
    train(2, RUN + ["--metrics-jsonl", str(tmp / "straight.jsonl")])
    proc = train(2, RUN + SAVES + ["--save", str(tmp / "ckpt")])
    return tmp / "ckpt", _metrics(tmp / "straight.jsonl"), proc.stdout


def _copy(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "ckpt")


@pytest.mark.launch
def test_every_file_is_listed_with_its_sha256_in_megatron_cores_manifest_format(saved):
    ckpt, _, stdout = saved
    for it in (2, 4, 6):
        path = ckpt / f"iter_{it:07d}"
        manifest = json.loads((path / "integrity.json").read_text())
        assert manifest["algorithm"] == "sha256"
        files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != "integrity.json")
        assert sorted(manifest["files"]) == files
        assert {"common.pt", "metadata.json", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(files)
        for name in files:  # hashed here with hashlib directly, not by the code under test
            assert manifest["files"][name] == hashlib.sha256((path / name).read_bytes()).hexdigest(), name
    # Each rank hashed the shard files it wrote: rank 1's are its own.
    last = ckpt / "iter_0000006"
    rank1 = sorted(p.name for p in last.glob("__1_*.distcp"))
    assert rank1 and checkpoint_integrity.shard_files_written_by(str(last), 1) == rank1
    assert "s of it hashing its files)" in stdout


@pytest.mark.launch
@pytest.mark.parametrize("name", ["__1_0.distcp", "common.pt", ".metadata", "metadata.json", "integrity.json"])
def test_one_changed_byte_in_any_file_is_named(saved, tmp_path, name):
    ckpt = _copy(saved, tmp_path)
    path = ckpt / "iter_0000006"
    assert damage_reason(str(path)) is None
    flip_one_byte(path / name, where=0.6)
    reason = damage_reason(str(path))
    if name == "integrity.json":  # the manifest itself: either unreadable, or some file no longer matches it
        assert reason is not None and str(path) in reason
    else:
        assert reason == f"{path / name} has changed since it was written (its sha256 is not the one in integrity.json)"
    assert "has changed" not in (damage_reason(str(path), readers=None) or "")  # unchecked: only what fails to parse
    assert checkpoint_path(str(ckpt)) == str(ckpt / "iter_0000004")


def test_the_ranks_shares_cover_every_listed_file_once(tmp_path):
    for i in range(7):
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * (i + 1))
    checkpoint_integrity.write_manifest(str(tmp_path), {})
    names = sorted(json.loads((tmp_path / "integrity.json").read_text())["files"])
    assert names == [f"f{i}" for i in range(7)]
    flip_one_byte(tmp_path / "f5")
    found = [checkpoint_integrity.changed_file(str(tmp_path), rank, 3) for rank in range(3)]
    assert found == [
        None,
        None,
        f"{tmp_path / 'f5'} has changed since it was written (its sha256 is not the one in integrity.json)",
    ]
    (tmp_path / "f1").unlink()
    assert (
        checkpoint_integrity.changed_file(str(tmp_path), 1, 3)
        == f"{tmp_path / 'f1'} is missing (listed in integrity.json)"
    )
    (tmp_path / "integrity.json").write_text("{not json")
    assert checkpoint_integrity.changed_file(str(tmp_path)).endswith("the manifest cannot be read (JSONDecodeError)")


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_a_resume_passes_over_changed_checkpoints_and_equals_an_uninterrupted_run(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    flip_one_byte(ckpt / "iter_0000006" / "__0_0.distcp")  # a tensor shard of the latest
    flip_one_byte(ckpt / "iter_0000004" / "common.pt")  # the common state of the one before
    proc = train(2, RUN + ["--load", str(ckpt), "--metrics-jsonl", str(tmp_path / "m.jsonl")])
    skipped = [line for line in proc.stdout.splitlines() if "skipping a damaged checkpoint" in line]
    assert skipped == [
        f"warning: skipping a damaged checkpoint: {ckpt}/iter_0000006/__0_0.distcp has changed since it was written "
        "(its sha256 is not the one in integrity.json)",
        f"warning: skipping a damaged checkpoint: {ckpt}/iter_0000004/common.pt has changed since it was written "
        "(its sha256 is not the one in integrity.json)",
    ]  # once for the job, not once per rank
    assert "resumed from" in proc.stdout and "at iteration 2" in proc.stdout
    resumed = _metrics(tmp_path / "m.jsonl")
    assert sorted(resumed) == list(range(3, 9))
    assert resumed == {i: saved[1][i] for i in range(3, 9)}


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_no_verify_integrity_neither_hashes_nor_checks_and_old_checkpoints_load_unverified(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    (ckpt / "iter_0000006" / "integrity.json").unlink()  # as saved before manifests were written
    proc = train(2, RUN + ["--load", str(ckpt), "--metrics-jsonl", str(tmp_path / "m.jsonl")])
    assert proc.stdout.count("has no integrity.json (saved before checkpoints were hashed): read unverified") == 1
    assert "at iteration 6" in proc.stdout
    assert _metrics(tmp_path / "m.jsonl") == {i: saved[1][i] for i in (7, 8)}
    # Off: a changed shard is not looked for (the run resumes from it), and new saves list nothing.
    flip_one_byte(ckpt / "iter_0000004" / "__1_0.distcp", where=0.99)
    fresh = tmp_path / "unhashed"
    off = ["--no-verify-integrity", "--save", str(fresh), "--save-interval", "4"]
    proc = train(2, RUN + ["--load", str(ckpt), "--ckpt-step", "4"] + off)
    assert "at iteration 4" in proc.stdout and "damaged" not in proc.stdout and "hashing" not in proc.stdout
    assert not list(fresh.glob("iter_*/integrity.json")) and (fresh / "iter_0000008" / "common.pt").is_file()
    # On, the same --ckpt-step is refused in one line naming the file.
    proc = train(2, RUN + ["--load", str(ckpt), "--ckpt-step", "4"], check=False)
    assert proc.returncode == 2
    error = f"error: --ckpt-step 4: {ckpt}/iter_0000004/__1_0.distcp has changed since it was written"
    assert (proc.stdout + proc.stderr).count(error) == 1


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_the_export_and_the_evaluation_check_the_same_way(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    flip_one_byte(ckpt / "iter_0000006" / "__1_0.distcp")
    env = subprocess_environment()
    export = [sys.executable, "tools/convert_to_hf.py", "--load", str(ckpt), "--output"]
    proc = subprocess.run(export + [str(tmp_path / "hf")], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping a damaged checkpoint: {ckpt}/iter_0000006/__1_0.distcp has changed" in proc.stdout
    assert "iter_0000004" in proc.stdout
    proc = subprocess.run(
        export + [str(tmp_path / "hf6"), "--ckpt-step", "6"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "__1_0.distcp has changed since it was written" in proc.stderr
    assert not (tmp_path / "hf6").exists()
    proc = subprocess.run(
        export + [str(tmp_path / "hf6"), "--ckpt-step", "6", "--no-verify-integrity"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The evaluation's reader (tools/evaluate.py and its --watch).
    tokenizer = str(REPO / "data" / "demo" / "crystal_demo.model")
    assert checkpoint_model.load(str(ckpt), tokenizer_model=tokenizer).iteration == 4
    with pytest.raises(CheckpointLoadError, match=r"iter_0000006/__1_0.distcp has changed since it was written"):
        checkpoint_model.load(str(ckpt), step=6, tokenizer_model=tokenizer)
    assert checkpoint_model.load(str(ckpt), 6, tokenizer, verify_integrity=False).iteration == 6
