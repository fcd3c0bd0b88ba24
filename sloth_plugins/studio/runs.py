"""The run manager: each run is a folder under the runs dir and, while it trains, a subprocess.

A run folder holds everything about the run, so the list survives a restart of the app::

    config.json     what to train (model folder, dataset file + column mapping, LoRA, SlothConfig, training)
    data/<file>     the dataset, copied in (uploads never leave the runs dir)
    status.json     state (created / starting / running / stopped / finished / failed), written atomically
    pid             the worker's process id while it runs
    train.log       the worker's stdout and stderr
    metrics.jsonl   one line per logged step: loss, learning rate, tokens/s, peak memory
    patch_report.txt  what SlothCallback patched
    checkpoints/    Trainer checkpoints (resume starts from the last one)
    adapter/        the trained adapter (or full model), saved at the end or on a clean stop
    STOP            present: the worker saves a checkpoint and the adapter and ends (a clean stop)

The worker (``python -m sloth_plugins.studio.worker RUN_DIR``) writes the states it reaches; a run
whose process is gone while its state still says it runs was killed: it is marked failed.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from . import datasets as studio_datasets
from .config import check_run_config

ACTIVE_STATES = ("starting", "running")
FINAL_STATES = ("stopped", "finished", "failed")


class StudioError(RuntimeError):
    """Something the studio cannot do; the message is for the user."""


def write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_status(run_dir: str, state: str, **fields: Any) -> None:
    status = read_json(os.path.join(run_dir, "status.json"), {}) or {}
    status.update(fields, state=state, updated=time.time())
    write_json_atomic(os.path.join(run_dir, "status.json"), status)


def _process_alive(pid: int, run_dir: str) -> bool:
    """The process ``pid`` exists, is not a zombie, and is this run's worker (pids get reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(run_dir.rstrip("/")).encode() in f.read()
    except (OSError, IndexError):
        return True   # no /proc (not Linux): the signal check is all there is


class RunManager:
    def __init__(self, runs_dir: str, python: str = sys.executable):
        self.runs_dir = os.path.abspath(runs_dir)
        self.python = python
        self._procs: Dict[str, subprocess.Popen] = {}

    # ---- creating -------------------------------------------------------------------------
    def create(self, config: Dict[str, Any], dataset_path: str) -> str:
        """A new run folder holding ``config`` and a copy of the dataset. Everything is checked
        first (the dataset parses and maps, the config is valid); a failure writes nothing, and a
        runs dir that cannot be written to raises StudioError and leaves the other runs as they are."""
        config = check_run_config(config)
        rows = studio_datasets.load_rows(dataset_path)
        studio_datasets.check_mapping(config["dataset"]["mapping"], studio_datasets.columns(rows))
        run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        final = os.path.join(self.runs_dir, run_id)
        tmp = os.path.join(self.runs_dir, f".creating-{run_id}")
        try:
            os.makedirs(self.runs_dir, exist_ok=True)
            os.makedirs(os.path.join(tmp, "data"))
            name = os.path.basename(dataset_path.rstrip("/"))
            target = os.path.join(tmp, "data", name)
            (shutil.copytree if os.path.isdir(dataset_path) else shutil.copyfile)(dataset_path, target)
            config = {**config, "dataset": {**config["dataset"], "file": os.path.join("data", name)}}
            write_json_atomic(os.path.join(tmp, "config.json"), config)
            write_json_atomic(os.path.join(tmp, "status.json"), {"state": "created", "created": time.time()})
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StudioError(f"cannot create a run in {self.runs_dir}: {exc.strerror or exc} "
                              f"(is the runs dir writable, is the disk full?); no run was created and the "
                              f"existing runs are untouched") from None
        return run_id

    # ---- running --------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> str:
        path = os.path.join(self.runs_dir, run_id)
        if os.sep in run_id or run_id.startswith(".") or not os.path.isfile(os.path.join(path, "config.json")):
            raise StudioError(f"no run {run_id!r} in {self.runs_dir}")
        return path

    def start(self, run_id: str, resume: bool = False) -> None:
        run_dir = self.run_dir(run_id)
        if self.status(run_id)["state"] in ACTIVE_STATES:
            raise StudioError(f"run {run_id} is already running")
        if resume and not last_checkpoint(run_dir):
            raise StudioError(f"run {run_id} has no checkpoint to resume from")
        self._procs.pop(run_id, None)   # the last worker's (a resume): status() must not read it as this one
        try:
            for stale in ("STOP", "pid"):
                if os.path.exists(os.path.join(run_dir, stale)):
                    os.remove(os.path.join(run_dir, stale))
            write_status(run_dir, "starting", resumed=resume, error=None)
            log = open(os.path.join(run_dir, "train.log"), "a")
        except OSError as exc:
            raise StudioError(f"cannot write to run {run_id}: {exc.strerror or exc}") from None
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [self.python, "-m", "sloth_plugins.studio.worker", run_dir] + (["--resume"] if resume else [])
        with log:
            # cwd=run_dir: `-m` puts the cwd on sys.path, and it must never be a checkout's root
            proc = subprocess.Popen(cmd, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[run_id] = proc
        with open(os.path.join(run_dir, "pid"), "w") as f:
            f.write(str(proc.pid))

    def stop(self, run_id: str) -> None:
        """A clean stop: the worker sees the STOP file at the next step, saves a checkpoint and the adapter."""
        run_dir = self.run_dir(run_id)
        if self.status(run_id)["state"] not in ACTIVE_STATES:
            raise StudioError(f"run {run_id} is not running")
        open(os.path.join(run_dir, "STOP"), "w").close()

    def kill(self, run_id: str) -> None:
        """End the worker now (no adapter is saved); the run is then marked failed."""
        pid = self._pid(self.run_dir(run_id))
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # ---- reading --------------------------------------------------------------------------
    def _pid(self, run_dir: str) -> Optional[int]:
        try:
            with open(os.path.join(run_dir, "pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def status(self, run_id: str) -> Dict[str, Any]:
        run_dir = self.run_dir(run_id)
        status = read_json(os.path.join(run_dir, "status.json"), {}) or {"state": "unknown"}
        if status.get("state") in ACTIVE_STATES:
            proc = self._procs.get(run_id)
            pid = self._pid(run_dir)
            if proc is not None and pid in (None, proc.pid):
                ended = proc.poll() is not None   # our own child: waitpid says it (and reaps it), no guessing
            else:
                ended = pid is not None and not _process_alive(pid, run_dir)   # a worker of an earlier app
            if ended:
                status = read_json(os.path.join(run_dir, "status.json"), {}) or {}   # it may just have finished
                if status.get("state") in ACTIVE_STATES:
                    code = proc.returncode if proc is not None else None
                    status.update(state="failed", error=f"the training process ended without saying why "
                                  f"(exit code {code}; killed?): see train.log")
                    try:
                        write_status(run_dir, "failed", error=status["error"])
                    except OSError:
                        pass
            elif os.path.exists(os.path.join(run_dir, "STOP")):
                status = {**status, "state": "stopping"}
        status["id"] = run_id
        return status

    def list(self) -> List[Dict[str, Any]]:
        """Every run in the runs dir, newest first, with its status and name."""
        if not os.path.isdir(self.runs_dir):
            return []
        runs = []
        for run_id in sorted(os.listdir(self.runs_dir), reverse=True):
            if run_id.startswith(".") or not os.path.isfile(os.path.join(self.runs_dir, run_id, "config.json")):
                continue
            config = read_json(os.path.join(self.runs_dir, run_id, "config.json"), {}) or {}
            runs.append({**self.status(run_id), "name": config.get("name") or run_id})
        return runs

    def config(self, run_id: str) -> Dict[str, Any]:
        return read_json(os.path.join(self.run_dir(run_id), "config.json"), {})

    def metrics(self, run_id: str) -> List[Dict[str, Any]]:
        rows = []
        try:
            with open(os.path.join(self.run_dir(run_id), "metrics.jsonl")) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass   # a line being written
        except OSError:
            pass
        return rows

    def loss_curves(self, run_ids: List[str]) -> List[Dict[str, Any]]:
        """Rows (step, loss, run) of each run's logged losses: one series per run, for one plot."""
        rows = []
        for run_id in run_ids:
            if not run_id:
                continue
            label = f"{self.config(run_id).get('name') or run_id} ({run_id})"
            rows += [{"step": m["step"], "loss": m["loss"], "run": label} for m in self.metrics(run_id)]
        return rows

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        try:
            with open(os.path.join(self.run_dir(run_id), "train.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def patch_report(self, run_id: str) -> str:
        try:
            with open(os.path.join(self.run_dir(run_id), "patch_report.txt")) as f:
                return f.read()
        except OSError:
            return ""

    def wait(self, run_id: str, timeout: float = 300.0, poll: float = 0.5) -> Dict[str, Any]:
        """Block until the run reaches a final state (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if status["state"] in FINAL_STATES or status["state"] == "created":
                return status
            if time.monotonic() > deadline:
                raise StudioError(f"run {run_id} still {status['state']} after {timeout:.0f} s")
            time.sleep(poll)


def last_checkpoint(run_dir: str) -> Optional[str]:
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = [(int(name.split("-")[1]), name) for name in os.listdir(folder)
             if name.startswith("checkpoint-") and name.split("-")[1].isdigit()]
    return os.path.join(folder, max(steps)[1]) if steps else None
