"""checkpoints.py: a run's state on disk: its folder, its checkpoints, and resuming it safely.

A run folder belongs to one run: popsd marks it (popsd_run.json) when it creates it and writes only
into a new or empty folder or one it marked; one live run at a time holds its lock (popsd_run.lock:
host, pid, start). A second run into it is refused (resume=true continues it, overwrite=true removes
what the run wrote, nothing else, and never through a symbolic link). Resuming checks the new config
against the run's saved one before anything on disk changes. Checkpoints are verified before use: a
damaged one is skipped with a warning (and kept for inspection). Everything is read as data only
(safetensors, JSON, torch weights_only): a checkpoint from someone else cannot run code. Weights and
optimizer state are gathered whole from FSDP shards and keyed by parameter name, so a checkpoint
resumes under any number of ranks.
"""
import errno
import json
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path

import torch

from plumbing import distributed, ema
from plumbing.config import current_names
from plumbing.data import DataStream, PopsdError
from plumbing.models import FINGERPRINT, same_base

MARKER, LOCK, SESSIONS = "popsd_run.json", "popsd_run.lock", "sessions.jsonl"
# in every adapter popsd saves (and a model folder may ship one): how to prompt it
PROMPTS_FILE = "popsd_prompts.json"
PROMPT_KEYS = ("student_template", "student_thinking", "teacher_template", "refonly_template",
               "teacher_thinking")


# in every adapter and checkpoint: the base it was trained from, by its checksum
BASE_FILE = "popsd_base.json"


def save_prompts(folder: Path, config: dict):
    """The prompt settings an adapter was trained with, next to it: eval.py reads them wherever it is copied;
    and the base it was trained from (its path and weights' checksum, when the config holds one:
    base_sha256)."""
    (folder / PROMPTS_FILE).write_text(json.dumps({k: config[k] for k in PROMPT_KEYS if k in config},
                                                  indent=1) + "\n")
    if config.get("base_sha256"):
        (folder / BASE_FILE).write_text(json.dumps({"model": config["model"],
                                                    "sha256": config["base_sha256"]}) + "\n")


def check_base(ckpt: Path, sha: str | None, path: str):
    """Resuming from another base than the one a checkpoint was trained from is an error (sha: the base's
    fingerprint now, at `path`; a checkpoint written before popsd recorded bases has no record: nothing to
    compare)."""
    try:
        saved = json.loads((ckpt / BASE_FILE).read_text())
    except (OSError, ValueError):
        return
    if sha and not same_base(saved.get("sha256"), path, sha):
        raise PopsdError(f"resume=true: {ckpt} was trained from a base whose checksum is "
                         f"{short_sha(saved.get('sha256'))}, and {saved.get('model')} now holds "
                         f"{short_sha(sha)}: the base changed since (replaced in place? its config, "
                         "tokenizer or chat template edited?). Resume with the base the run started from, or "
                         "start a new run in another out_dir")


def short_sha(sha) -> str:
    return f"{str(sha).removeprefix(FINGERPRINT)[:12]}…"


RUN_FILES = ("config.json", SESSIONS, "metrics.jsonl", "samples.txt", "plots.png", "adapter", "adapter.tmp",
             # all overwrite removes
             "adapter.old", "checkpoints", "eval", "tiny_model", "rollout_adapters", "tensorboard", "wandb")
RECORD_ONLY = ("base_sha256", "data_sha256", "data_rows")  # in config.json beside the Config's fields
MAY_CHANGE = {  # config fields a resumed run may change: run control, evaluation, speed knobs
    "steps", "save_every", "keep_checkpoints", "resume", "overwrite", "samples_per_step", "threads", "device",
    "recipe", "out_dir", "report_to", "resume_data_changed",
    # speed: the same numbers (both loss paths: tests/test_popsd.py; the graph sampler's modes draw each row
    # from its own seed: tests/test_graph_engine.py)
    "gen_batch_size", "micro_batch_size", "loss_impl", "loss_chunk_mb", "loss_compile", "graph_keep_rows",
    "graph_kv_gb", "sample_gathered",
    "rollout_engine", "rollout_server", "rollout_adapter_dir", "rollout_concurrency", "vllm_gpu_memory",
    "vllm_kv_cache_gb", "vllm_enforce_eager", "sampler_gap_warn", "sampler_gap_stop", "server_timeout",
    "eval_every", "eval_bench", "eval_fields", "eval_n", "eval_limit", "eval_max_new_tokens",
    "eval_temperature", "eval_top_p", "eval_grader"}


def record_session(out: Path, config: dict, start: int):
    """config.json: the config of the session now running (the base's checksum included); sessions.jsonl: one
    line per session (where it started, what it changed against the session before, its sampler, the base, the
    library versions), so a resumed run's history is true whatever each session ran with."""
    import peft
    import transformers
    before = {}
    if start and (out / "config.json").is_file():
        try:
            before = current_names(json.loads((out / "config.json").read_text()))
        except (ValueError, AttributeError):
            pass
    changed = {k: [before[k], v] for k, v in config.items()
               if k in before and before[k] != v and k not in ("resume", "overwrite")}
    line = {"from_step": start, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(),
            "sampler": config.get("rollout_server") or config.get("rollout_engine"), "changed": changed,
            "base_sha256": config.get("base_sha256"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}
    with open(out / SESSIONS, "a") as f:
        f.write(json.dumps(line) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def trim_logs(out: Path, start: int, warn=print):
    """metrics.jsonl and samples.txt as they stood at the checkpoint of step `start` (0: empty): what a run
    logged after it is redone by the resumed run, so every step is logged once. A torn last line (what kill -9
    can leave) is dropped with a warning; a damaged line before it is an error naming it."""
    metrics, kept = out / "metrics.jsonl", []
    lines = metrics.read_text().splitlines() if start and metrics.exists() else []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines):
                warn(f"warning: {metrics} line {i} is cut short (an interrupted write): dropped")
                break
            raise PopsdError(f"{metrics} line {i} is not JSON: the run's log is damaged; repair or remove "
                             "the line, then resume again") from None
        if row.get("step", 0) <= start:
            kept.append(line)
    metrics.write_text("".join(line + "\n" for line in kept))
    samples = out / "samples.txt"
    if samples.exists():  # blocks start with "===== step N sample i"
        blocks = re.split(r"(?m)^(?====== step \d+ sample \d+$)", samples.read_text()) if start else []
        steps = [re.match(r"===== step (\d+)", b) for b in blocks]
        samples.write_text("".join(b for b, m in zip(blocks, steps) if m is None or int(m[1]) <= start))


def trainable_state(model) -> dict:
    """The trainable (LoRA) weights by parameter name, whole, on the CPU. Under FSDP every rank must call
    it."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for n, p in model.named_parameters() if p.requires_grad}


def usual_modes(folder: Path):
    """safetensors writes its file 0600; give it the mode every other file gets here (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink() and f.stat().st_mode & 0o777 == 0o600:
            f.chmod(0o666 & ~mask)


def save_adapter(model, weights: dict, folder: Path):
    """An adapter in PEFT format (adapter_config.json + adapter_model.safetensors) for a sampling engine."""
    # never the EMA's
    model.save_pretrained(folder, state_dict=weights, selected_adapters=[model.active_adapter])
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card: not needed by an engine
    usual_modes(folder)


def check_finite(weights: dict):
    """A non-finite adapter is never saved."""
    bad = [n for n, w in weights.items() if not torch.isfinite(w).all()]
    if bad:
        raise PopsdError("the adapter holds non-finite values "
                         f"({bad[0]}{' and more' if len(bad) > 1 else ''}): not saved; the run diverged "
                         "(lower lr or max_grad_norm)")


def disk_full(e: BaseException, folder: Path, what: str) -> PopsdError | None:
    """A clear error when `e` (raised while writing `what` into `folder`) is a full disk, else None."""
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e) or (
        # torch.save's way of saying it
        "enforce fail" in str(e) and shutil.disk_usage(folder).free < 64 << 20)
    if not full:
        return None
    free = shutil.disk_usage(folder).free / 2 ** 20
    return PopsdError(f"the disk holding {folder} is full ({free:.1f} MB free) while writing {what}: nothing "
                      "of it was kept and the checkpoints before it are intact; free some space, "
                      "then resume=true")


def replace_folder(tmp: Path, final: Path):
    """final ← tmp, a folder each. A folder cannot be replaced in one step, so the old one is first renamed
    aside (final.old) and removed after: an interruption anywhere leaves a whole folder under final's name or
    under final.old's (recover_folders puts it back)."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def recover_folders(parent: Path, pattern: str, warn=print):
    """A folder left as <name>.old by an interrupted replace_folder goes back to its name (or is removed when
    the new one made it)."""
    for old in parent.glob(pattern + ".old"):
        final = old.with_name(old.name[:-len(".old")])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
            warn(f"{final}: put back from {old.name}, where an interrupted save left it")


def save_final_adapter(out: Path, model, tokenizer, weights: dict, config: dict):
    """out/adapter: the trained adapter in PEFT format with the tokenizer and the prompt settings, written to
    adapter.tmp and renamed, so a failed write (a full disk) leaves no partial adapter behind."""
    final = out / "adapter"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights, selected_adapters=[model.active_adapter])
        tokenizer.save_pretrained(tmp)
        save_prompts(tmp, config)
        usual_modes(tmp)
    except Exception as e:  # tokenizers reports a full disk as a bare Exception
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full(e, out, "the final adapter") or e
    replace_folder(tmp, final)


# in a checkpoint kept without the next step's rollouts: the adapter that samples them
SAMPLING_ADAPTER = "sampling_adapter"


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, stream: DataStream, keep: int,
                    rank: int = 0, config: dict | None = None, ahead: dict | None = None,
                    sampling: tuple[int, Path] | None = None):
    """Adapter (PEFT format) + optimizer, scheduler, step, RNG and data position; written to .tmp, then
    renamed.

    Every checkpoint keeps its adapter (the paper reports the best of several steps); the resume state
    (state.pt: optimizer and RNG, the bulk for a large adapter) is kept for the newest `keep` only.
    Weights and optimizer state are saved whole (gathered from the FSDP shards, keyed by parameter name),
    so a checkpoint resumes under any number of ranks. `ahead`: this rank's rollouts of the next step, sampled
    ahead (Rollout.state(); rollout_ahead=1), kept with it so that a resume trains on the same; or, where
    they are not (a stop, their failure, the last step), `sampling`: (its step, its folder), the adapter that
    samples them (one step older than this one), kept as sampling_adapter/ so that a resume samples them as
    the straight run did.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    weights = trainable_state(model)
    check_finite(weights)
    # an optimizer that has not stepped yet (a stop before step 1) is saved as none: torch's state-dict
    # helpers would first initialise it with a zero-lr step, and the resumed AdamW would count one step more
    # than the straight run's (another bias correction, another update)
    stepped = distributed.all_sum([len(optimizer.state)])[0] > 0
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True)) if stepped else None
    teacher = ema.state(model)  # resume state, like the optimizer's ({} without an EMA teacher)
    rng = distributed.gather({"python": random.getstate(), "torch": torch.get_rng_state(),
                  "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
    ahead = distributed.gather(ahead)  # every rank's share, in rank order
    final = out / "checkpoints" / f"step_{step:06d}"
    if rank == 0:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, state_dict=weights, selected_adapters=[model.active_adapter])
            if config:
                save_prompts(tmp, config)
            usual_modes(tmp)
            kept_ahead = all(a is not None for a in ahead)
            if sampling is not None and not kept_ahead:
                shutil.copytree(sampling[1], tmp / SAMPLING_ADAPTER)
            torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(),
                        "data": {"epoch": stream.epoch, "cursor": stream.cursor}, "rng": rng,
                        **({"ema": teacher} if teacher else {}),
                        **({"ahead": ahead} if kept_ahead else {}),
                        **({"sampling_step": sampling[0]} if sampling is not None and not kept_ahead
                           else {})},
                       tmp / "state.pt")
        except Exception as e:  # OSError, torch's RuntimeError, tokenizers' bare Exception
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint is never left behind
            raise disk_full(e, out, f"the checkpoint of step {step}") or e
        replace_folder(tmp, final)
        for old in sorted((out / "checkpoints").glob("step_??????"))[:-keep]:  # every adapter stays: the best
            (old / "state.pt").unlink(missing_ok=True)  # step is chosen later; only resume state is pruned
    distributed.barrier()
    return final


def latest_checkpoint(out: Path, warn=print) -> Path | None:
    """The newest checkpoint that can be resumed (adapter and state, both readable); damaged ones are skipped
    with a warning and left in place. None when there is none; an error when every one is damaged."""
    recover_folders(out / "checkpoints", "step_??????", warn)
    recover_folders(out, "adapter", warn)
    found = sorted(p for p in (out / "checkpoints").glob("step_??????") if (p / "state.pt").exists())
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"warning: skipping the damaged checkpoint {path} ({problem}); it is left there for inspection")
    if found:
        older = sorted(p.name for p in (out / "checkpoints").glob("step_??????")
                       if not (p / "state.pt").exists())
        kept = (f"; the adapters of {', '.join(older)} are kept but hold no resume state (keep_checkpoints "
                "pruned it): eval.py --adapter evaluates them") if older else ""
        names = ", ".join(p.name for p in found)
        raise PopsdError(f"every checkpoint in {out / 'checkpoints'} that holds resume state ({names}) is "
                         f"damaged (see the warnings above){kept}. To train on, start afresh with "
                         "overwrite=true, or use another out_dir")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed (unreadable adapter or state), or None."""
    from safetensors.torch import load_file
    try:
        load_file(path / "adapter_model.safetensors")
    except Exception as e:
        return f"adapter_model.safetensors: {str(e).splitlines()[0][:200]}"
    try:
        state = torch.load(path / "state.pt", weights_only=True)
        assert {"step", "optimizer", "scheduler", "data", "rng"} <= set(state), "fields missing"
    except Exception as e:
        return f"state.pt: {str(e).splitlines()[0][:200]}"
    return None


def folder_kind(out: Path, fields) -> str:
    """'new' (missing or empty), 'run' (popsd's marker in it, or a run from before the marker: a config.json
    that parses as a popsd config next to a metrics.jsonl) or 'foreign' (anything else: popsd writes nothing
    there)."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        return "foreign"
    if (out / MARKER).is_file():
        return "run"
    try:
        saved = json.loads((out / "config.json").read_text())
        if isinstance(saved, dict) and {"model", "method",
                                        "out_dir"} <= set(saved) <= {*fields, *RECORD_ONLY} and \
                (out / "metrics.jsonl").is_file():
            return "run"
    except (OSError, ValueError):
        pass
    return "new" if not any(out.iterdir()) else "foreign"


def links_in(out: Path) -> list[Path]:
    """Symbolic links among the entries a run writes and below them that lead out of the folder: writing
    through one would leave it (a link within it is harmless). Inside wandb/ only W&B writes, links of its own
    included."""
    found, home = [], Path(os.path.realpath(out))
    for name in RUN_FILES + (MARKER, LOCK):
        top = out / name
        if top.is_symlink():
            found.append(top)
        elif top.is_dir() and name != "wandb":
            for root, dirs, files in os.walk(top):  # os.walk does not follow links to folders
                found += [Path(root, n) for n in dirs + files if Path(root, n).is_symlink()]
    return [p for p in found if home not in Path(os.path.realpath(p)).parents]


def check_out_dir(out: Path, inputs: list[Path], key: str = "out_dir", who: str = "run"):
    """An output folder must not be, or hold, the model or the data: a run writes config.json and more into
    it."""
    here = out.resolve()
    for path in inputs:
        there = path.resolve()
        if there == here or here in there.parents:
            raise PopsdError(f"{key} {out} {'is' if there == here else 'holds'} {path}, which this {who} "
                             f"reads: write the {who} to another folder")


def process_start(pid: int) -> str | None:
    """When process `pid` started (Linux: its start time in clock ticks since boot), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "alive"


class RunLock:
    """One live run per folder. popsd_run.lock is held under an exclusive flock for the run's life, which the
    kernel lets go however the process ends, and names its holder (host, pid, process start, since). Taking
    it is one atomic step: two runs started at once, or two that find a dead run's lock, never both hold it
    (tests/test_safety.py races them). A lock file nobody holds the flock of is free; what it names still
    counts where a flock cannot be seen: a holder on another host (a network disk) is an error naming it,
    and so is a live process on this host (a run of a popsd from before the flock)."""

    def __init__(self, out: Path, warn=print):
        self.path, self.warn, self.fd = out / LOCK, warn, None

    def acquire(self):
        import fcntl
        if self.path.is_symlink():  # a lock is never a link: popsd writes nothing through one
            self.warn(f"replacing {self.path}, a symbolic link, with a lock file")
            self.path.unlink()
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PopsdError(f"{self.path.parent} is in use by another run: {self.holder()}: one live "
                                 "run per folder (wait for it, or stop it)") from None
            try:  # released and removed between our open and our flock: that file is no one's lock
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                self.check_previous()
                me = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return self
        raise PopsdError(f"could not take the lock {self.path}: other runs kept taking it meanwhile")

    def read(self) -> dict:
        try:
            other = json.loads(self.path.read_text())
            return other if isinstance(other, dict) else {}
        except (OSError, ValueError):
            return {}

    def holder(self) -> str:
        other = self.read()
        if other.get("host") == socket.gethostname() and other.get("pid"):
            return f"process {other['pid']} on this machine, since {other.get('since')}"
        return f"on {other['host']}, pid {other.get('pid')}" if other.get("host") else "it is starting now"

    def check_previous(self):
        """With the flock held: what the file says of the run before. A live holder we cannot see through the
        flock is an error; a dead one on this host (a crash, kill -9) is taken over, with a word."""
        other = self.read()
        if not other:
            return  # a new lock, or a run that released it
        host, pid, start = other.get("host"), other.get("pid"), other.get("start")
        if host != socket.gethostname():
            raise PopsdError(f"{self.path.parent} is in use by a run on {host} (pid {pid}, since "
                             f"{other.get('since')}): one live run per folder. If that run is gone (a "
                             f"crash), remove {self.path} and start again")
        now = process_start(int(pid)) if isinstance(pid, int) else None
        if now is not None and (start is None or now in (start, "alive")):
            raise PopsdError(f"{self.path.parent} is in use by another run: process {pid} on this "
                             f"machine, since {other.get('since')}: one live run per folder (wait for "
                             "it, or stop it)")
        self.warn(f"taking over the stale lock {self.path} (its process {pid} is gone)")

    def release(self):
        """The file goes first (under the flock, so a run that opened it meanwhile sees it gone), then the
        flock."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def present(folder: Path, names) -> list[str]:
    """The names that exist in folder (a dangling link counts: it is there)."""
    return [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]


# what popsd
OWNED = {"eval": r"step_\d{6}(\.tmp)?", "checkpoints": r"step_\d{6}(\.tmp|\.old)?",
         "rollout_adapters": r"popsd-.+"}
# writes inside these folders: overwrite=true removes only that, and the folder once empty


def remove_run_files(out: Path, names, warn=print) -> list[str]:
    """Removes a run's entries of `out`, a link as a link; of the folders in OWNED only what popsd wrote
    there: anything else in them (a user's notes in eval/) stays, with its folder, and is named in a warning.
    Returns what was removed."""
    removed = []
    for name in present(out, names):
        path = out / name
        if name in OWNED and path.is_dir() and not path.is_symlink():
            remove_entries(path, [c.name for c in path.iterdir() if re.fullmatch(OWNED[name], c.name)])
            if left := sorted(c.name for c in path.iterdir()):
                warn(f"kept {', '.join(f'{name}/{c}' for c in left)} in {out}: popsd did not write it")
                removed.append(f"{name}/ (popsd's entries)")
                continue
            path.rmdir()
        else:
            remove_entries(out, [name])
        removed.append(name)
    return removed


def logged_nothing(out: Path) -> bool:
    """A run that stopped before its first step (a sampler or a tracker that would not start, a wrong setting
    found late): no metrics row, checkpoint, adapter or evaluation. Nothing of value (a tracker holds only
    what metrics.jsonl holds): a plain rerun may replace it."""
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        return False
    return not any((out / n).exists() for n in ("adapter", "eval")) and \
        not any((out / "checkpoints").glob("step_*"))


def remove_entries(folder: Path, names) -> list[str]:
    """Removes the named entries of folder, a link as a link (never what it points to); returns those
    removed."""
    gone = present(folder, names)
    for n in gone:
        path = folder / n
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return gone


def prepare_run_folder(out: Path, config: dict, resume: bool, overwrite: bool, warn=print,
                       inputs: list[Path] = ()) -> tuple[Path | None, RunLock]:
    """Checks the run folder before anything in it changes, then takes its lock and marks it; returns the
    checkpoint to resume (or None) and the lock (release it when the run ends).

    popsd writes only into a new or empty folder or a popsd run. A folder holding a run is refused unless
    resume=true (then the new config must agree with the saved one on every field outside MAY_CHANGE) or
    overwrite=true (the run's files are removed, nothing else)."""
    check_out_dir(out, list(inputs))
    if out.is_symlink() and not out.exists():
        raise PopsdError(f"out_dir {out} is a symbolic link to {os.readlink(out)}, which does not exist: "
                         "create that folder, or choose another out_dir")
    kind = folder_kind(out, config)
    if kind == "foreign":
        raise PopsdError(f"{out} is not a popsd run folder "
                         f"({'a file' if out.is_file() else f'no {MARKER} in it'}) and not empty: popsd "
                         "writes only into a new or empty folder or one of its own runs, and overwrite=true "
                         "removes only a popsd run; choose another out_dir")
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, warn).acquire()
    try:
        ckpt = open_folder(out, kind, config, resume, overwrite, warn)
        if (out / MARKER).is_symlink():
            (out / MARKER).unlink()  # written here, never through a link
        (out / MARKER).write_text(json.dumps({"popsd": "run folder"}) + "\n")
        return ckpt, lock
    except BaseException:
        lock.release()
        raise


def open_folder(out: Path, kind: str, config: dict, resume: bool, overwrite: bool, warn) -> Path | None:
    held = present(out, RUN_FILES)
    if kind == "new" or not held:
        if resume:
            warn(f"resume=true: {out} holds no run, starting afresh")
        return None
    if overwrite and not resume:
        warn("overwrite=true: removed the previous run's "
             f"{', '.join(remove_run_files(out, held, warn))} from {out}")
        return None
    if not resume and logged_nothing(out) and not links_in(out):
        warn(f"replacing the run in {out}, which stopped before its first step ({', '.join(held)})")
        remove_run_files(out, held, warn)
        return None
    if links := links_in(out):
        raise PopsdError(f"{links[0]} is a symbolic link: a run writes only inside its folder; remove the "
                         "link (or start afresh with overwrite=true, which removes it, not what it points "
                         "to)")
    if not resume:
        raise PopsdError(f"{out} already holds a run ({', '.join(held)}): continue it with resume=true, "
                         "write this one elsewhere with out_dir=..., or replace it with overwrite=true")
    saved_path = out / "config.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    saved = current_names(saved)  # a run saved before the keys were renamed
    changed = {k: (saved[k], v) for k, v in config.items() if k in saved and saved[k] != v}
    fixed = {k: ov for k, ov in changed.items() if k not in MAY_CHANGE}
    if fixed:
        raise PopsdError(f"resume=true: this config differs from the run's ({saved_path}) in fields that "
                         "change the model, the data order or the algorithm: " +
                         "; ".join(f"{k}: {o!r} → {n!r}" for k, (o, n) in fixed.items()) +
                         ". Use the run's values, or start a new run in another out_dir")
    for k, (o, n) in changed.items():
        if k not in ("resume", "overwrite"):
            warn(f"resume: {k} changes {o!r} → {n!r}")
    ckpt = latest_checkpoint(out, warn)
    if ckpt is None:
        raise PopsdError(f"resume=true: {out} holds a run ({', '.join(held)}) but no checkpoint to resume "
                         "from: replace it with overwrite=true, or use another out_dir")
    return ckpt


def load_checkpoint(path: Path, model, optimizer, scheduler, stream: DataStream, seed: int = 0, rank: int = 0,
                    world: int = 1, ahead=None) -> tuple[int, tuple[int, Path] | None]:
    """Restores a checkpoint written under any number of ranks: (its step, the adapter that samples the next
    step (its step, its folder) if the checkpoint kept it instead of the rollouts, else None). Each rank's RNG
    state comes back when the world size is the same; under another world size each rank's RNG is reseeded
    from (seed, step, rank). `ahead` (engines.ahead.Ahead) gets the next step's rollouts if the checkpoint
    kept them under as many ranks (otherwise that step is sampled anew)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    saved = load_file(path / "adapter_model.safetensors")  # PEFT leaves the adapter name out of the keys
    name = model.active_adapter
    weights = {n: saved[n.replace(f".{name}.", ".")] for n, p in model.named_parameters() if p.requires_grad}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    state = torch.load(path / "state.pt", weights_only=True)  # data only: a checkpoint cannot run code
    if state["optimizer"] is not None:  # None: saved before the first step, the optimizer stays fresh
        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    if ema.named(model):
        if "ema" not in state:
            raise PopsdError(f"{path} holds no EMA teacher (the run was not teacher=ema): resume it with "
                             "its own teacher")
        ema.load(model, state["ema"])
    stream.epoch, stream.cursor = state["data"]["epoch"], state["data"]["cursor"]
    if len(state["rng"]) == world:
        rng = state["rng"][rank]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        random.seed(seed + state["step"])
        torch.manual_seed(seed + 1000 * state["step"] + rank)
    if ahead is not None and len(state.get("ahead", [])) == world:
        ahead.restore(state["step"] + 1, state["ahead"][rank])
        return state["step"], None
    if "sampling_step" in state and (path / SAMPLING_ADAPTER).is_dir():
        return state["step"], (state["sampling_step"], path / SAMPLING_ADAPTER)
    return state["step"], None
