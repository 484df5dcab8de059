"""In-job restarts under `torchrun --max-restarts`: each attempt says which restart it is, why the last one
ended and where it resumes; a job whose restarts keep resuming from one checkpoint stops instead of looping.

torchrun's elastic agent restarts every worker of the job when one of them fails (killed, crashed, out of
memory, or ended on --distributed-timeout-minutes); it tells the new workers only which attempt they are
(TORCHELASTIC_RESTART_COUNT, of TORCHELASTIC_MAX_RESTARTS). What the next attempt needs is kept beside the
checkpoints it resumes from, in --save (on every node, as the checkpoints are), under restarts/:
- attempt_<n>.json, by rank 0: the attempt's world size and the iteration it resumed at;
- attempt_<n>.rank_<r>.txt, by a rank that ends on an error: its one line (a killed rank leaves none; the
  agent's own log names its exit code).
Attempt 0 (a new torchrun: a new job or a SLURM requeue) starts the directory afresh. A restart that would be
the (bound + 1)-th in a row to resume at one iteration (its failure repeats before the next save) stops the
job: rank 0 says so in one line and writes restarts/stopped, and every rank exits 0, the one exit torchrun
does not restart; examples/slurm/launch.sh turns the marker into the job's failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import torch

from megatron_ext.atomic_files import write_text_atomically

DIRECTORY = "restarts"
STOPPED = "stopped"  # the marker examples/slurm/launch.sh reads
_LINE_CHARS = 600  # of a rank's line in the next attempt's report
_RANKS_SHOWN = 4
ERROR_PREFIX = "pretrain_crystal.py: error: "


@dataclasses.dataclass(frozen=True)
class Attempt:
    """This process's attempt of a torchrun job that may restart, with its record directory."""

    number: int
    max_restarts: int
    directory: str
    bound: int  # --max-restarts-from-one-checkpoint

    @classmethod
    def under_torchrun(cls, save: str | None, bound: int, environ=os.environ) -> Attempt | None:
        """None unless torchrun may restart this job and there is a --save to keep the record in."""
        if save is None or int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
            return None
        return cls(
            number=int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            max_restarts=int(environ["TORCHELASTIC_MAX_RESTARTS"]),
            directory=os.path.join(save, DIRECTORY),
            bound=bound,
        )

    def _record(self, number: int) -> str:
        return os.path.join(self.directory, f"attempt_{number}.json")

    def begin(self) -> None:
        """Rank 0, before anything can fail: a first attempt clears the last job's record."""
        if torch.distributed.get_rank() != 0:
            return
        if self.number == 0:
            shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory, exist_ok=True)
        self._write(resumed_at=None)

    def _write(self, resumed_at: int | None) -> None:
        record = {"attempt": self.number, "world_size": torch.distributed.get_world_size(), "resumed_at": resumed_at}
        write_text_atomically(self._record(self.number), json.dumps(record))

    def ended(self, line: str, code: int | None = None) -> None:
        """Any rank that ends on an error: its one line (and exit code), for the next attempt's report. Never
        raises: it runs on the way out of a failure."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))
        try:
            path = os.path.join(self.directory, f"attempt_{self.number}.rank_{rank}.txt")
            first = line.strip().splitlines()[0] if line.strip() else ""
            text = first.removeprefix(ERROR_PREFIX).split("; the job ends")[0][:_LINE_CHARS]
            write_text_atomically(path, text + (f" (exit {code})" if code is not None else ""))
        except OSError:
            pass

    def how_the_last_ended(self) -> str:
        """The previous attempt's end in one line: each rank's own line, then the ranks that left none."""
        last = self.number - 1
        lines = {}
        for name in os.listdir(self.directory):
            prefix = f"attempt_{last}.rank_"
            if name.startswith(prefix) and name.endswith(".txt"):
                with open(os.path.join(self.directory, name)) as f:
                    lines[int(name[len(prefix) : -len(".txt")])] = f.read().strip()
        world = (self._read(last) or {}).get("world_size")

        # The same line from many ranks (a full disk, a lost peer) is said once: lines that differ only in
        # their figures (each rank's free bytes) are one, shown with the first rank's figures.
        def own(r: int) -> tuple[bool, str]:  # (the line began "rank r ", the rest)
            mine = f"rank {r} "
            return (True, lines[r][len(mine) :]) if lines[r].startswith(mine) else (False, lines[r])

        by_shape: dict[tuple[bool, str], list[int]] = {}
        for r in sorted(lines):
            named, text = own(r)
            by_shape.setdefault((named, re.sub(r"\d[\d,.]*", "#", text)), []).append(r)
        said = []
        for (named, _), ranks in list(by_shape.items())[:_RANKS_SHOWN]:
            text = own(ranks[0])[1]
            alike = "" if all(own(r)[1] == text for r in ranks) else f" (rank {ranks[0]}'s figures)"
            said.append(f"{_ranks(ranks)}{' ' if named else ': '}{text}{alike}")
        if len(by_shape) > _RANKS_SHOWN:
            said.append(f"{len(by_shape) - _RANKS_SHOWN} more distinct lines in {self.directory}")
        silent = [r for r in range(world) if r not in lines] if world else []
        if silent:
            said.append(
                f"{_ranks(silent)} left no line (killed by a signal or the out-of-memory killer, or crashed: "
                "torchrun's log above names the exit code)"
            )
        if world is None:
            said.append("it ended before it could record its start")
        return "; ".join(said) or "no rank left a line"

    def _read(self, number: int) -> dict | None:
        try:
            with open(self._record(number)) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def resumed(self, iteration: int) -> str | None:
        """Every rank, once the resume point is loaded: rank 0 records it and reports a restart; the job's
        verdict (the same on every rank): None to train on, else the line that stops it."""
        verdict = [None]
        if torch.distributed.get_rank() == 0:
            verdict[0] = self._judge(iteration)
        torch.distributed.broadcast_object_list(verdict, src=0)
        return verdict[0]

    def _judge(self, iteration: int) -> str | None:
        self._write(resumed_at=iteration)
        if self.number == 0:
            return None
        cause = self.how_the_last_ended()
        # Restarts in a row before this one that resumed here (or ended before they resumed at all).
        in_a_row = 0
        for number in range(self.number - 1, 0, -1):
            if (self._read(number) or {}).get("resumed_at", iteration) not in (iteration, None):
                break
            in_a_row += 1
        if in_a_row >= self.bound:
            line = (
                f"restart {self.number}: the last {in_a_row} restart{'s' if in_a_row > 1 else ''} resumed at "
                f"iteration {iteration} too and failed before the next checkpoint (--max-restarts-from-one-checkpoint "
                f"{self.bound}): the failure repeats; the job stops instead of restarting again (attempt "
                f"{self.number - 1} ended: {cause})"
            )
            write_text_atomically(os.path.join(self.directory, STOPPED), line + "\n")
            return line
        print(
            f"restart {self.number} of at most {self.max_restarts} (torchrun --max-restarts): attempt "
            f"{self.number - 1} ended: {cause}; resuming at iteration {iteration} (restart {in_a_row + 1} from it, "
            f"of --max-restarts-from-one-checkpoint {self.bound})",
            flush=True,
        )
        return None


def _ranks(ranks: list[int]) -> str:
    """ "rank 3", "ranks 0, 1", "ranks 0, 1, 2, 3 and 60 more"."""
    shown = ", ".join(map(str, ranks[:_RANKS_SHOWN]))
    more = f" and {len(ranks) - _RANKS_SHOWN} more" if len(ranks) > _RANKS_SHOWN else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}{more}"


def warnings(save: str | None, load: str | None, environ=os.environ) -> list[str]:
    """What makes torchrun's restarts less than they seem, said once at start-up."""
    restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts == 0:
        return []
    if save is None:
        return [f"warning: torchrun may restart this job {restarts} times (--max-restarts), but without --save each "
                "restart trains again from where this attempt began, and the restarts are not bounded"]  # fmt: skip
    if load is None or os.path.realpath(load) != os.path.realpath(save):
        return [f"warning: torchrun may restart this job {restarts} times (--max-restarts): a restart resumes from "
                f"--load ({load}), not from the checkpoints this job saves in --save {save}: pass the same "
                "directory to both"]  # fmt: skip
    return []
