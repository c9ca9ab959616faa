"""session.py: everything one training run needs around popsd.py's loop, behind one object.

    with Session(cfg) as run:              # set-up: ranks, run folder and lock, data, model, optimizer,
        for step, batch in run.steps():    #   checkpoint, logs, trackers, sampler, signals, progress bar
            with run.sampling(step, n) as on_batch: ...   # progress; a stop while sampling drops the step
            with run.timed(row, "time_sync"): ...
            run.log(row, rollout)          # guards, evaluation when due, metrics.jsonl, trackers, step line
            run.save(step, rollout)        # checkpoints, and the exit a Ctrl-C or SIGTERM asked for
        run.finish()                       # the final adapter and plots.png

None of this is the algorithm (popsd.py is): it keeps a run safe and visible. The run folder's rules are
checkpoints.py's, the guards guards.py's, the engines engines/'s. Rank 0 alone prints, writes and saves.
"""
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import eval as E
import plots
from engines import graph_rows, make_sampler
from engines.ahead import Ahead
from plumbing import distributed, ema, guards
from plumbing.checkpoints import (check_base, check_finite, latest_checkpoint, load_checkpoint,
                                  prepare_run_folder, record_session, save_checkpoint, save_final_adapter,
                                  trainable_state, trim_logs)
from plumbing.config import Config, derived_sizes, print_config
from plumbing.data import DataStream, PopsdError, build_tiny_model, read_rows, resolve_local
from plumbing.models import (base_fingerprint, eos_ids, fit_new_tokens, load_model, make_optimizer,
                             model_parts, pick_device)
from plumbing.trackers import Trackers
from rollout import Rollout, build_contexts, control_tokens

console = Console()
warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*")


def warn(message: str):
    console.print(f"[yellow]{message}[/]", soft_wrap=True)


def fatal(error: Exception) -> int:
    """A run's fatal error, one line on the screen whichever rank meets it (ranks other than 0 are otherwise
    quiet: under torchrun the user would see only the collective's traceback); the exit code."""
    rank = os.environ.get("RANK", "0")
    console.quiet = False
    console.print(f"[bold red]error{f' (rank {rank})' if rank != '0' else ''}:[/] {error}", soft_wrap=True)
    return 2


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


class StopRequest:
    """First Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit. A second one stops at once."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signum = signum
        console.print(f"[yellow]{signal.Signals(signum).name}: finishing this step (a step still sampling is "
                      "dropped), then saving a checkpoint; a second one stops at once[/]")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


class RunDone(PopsdError):
    """A resume of a run that is done up to the steps asked for: nothing to run (not an error)."""


def check_data(out: Path, data: dict, go_on: bool):
    """A resumed run reads the training rows it started with: the data order is a cursor into them, so other
    rows (added, removed, edited) make another run. Refused, naming what changed, unless go_on
    (resume_data_changed=true), said aloud; sessions.jsonl records the change either way."""
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict) or saved.get("data_sha256") in (None, data["data_sha256"]):
        return  # a run from before popsd recorded its data: nothing to compare
    what = (f"{saved.get('data')}: {saved.get('data_rows')} rows → {data['data_rows']}, checksum "
            f"{saved['data_sha256'][:12]}… → {data['data_sha256'][:12]}…")
    if not go_on:
        raise PopsdError(f"resume=true: the training data changed since the run started ({what}); the data "
                         "order would be another run's. Resume with the data the run started with, or pass "
                         "resume_data_changed=true to go on with these rows (sessions.jsonl records it)")
    warn(f"resume: the training data changed ({what}): going on, as resume_data_changed=true asks")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


class SamplingStopped(Exception):
    """Ctrl-C or SIGTERM arrived while a step was still sampling: the step is dropped, not finished."""


def position(stream: DataStream) -> dict:
    """Where the run stands before a step: the data position and every random state (restored if it is
    dropped)."""
    return {"data": (stream.epoch, stream.cursor), "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def go_back(stream: DataStream, saved: dict):
    stream.epoch, stream.cursor = saved["data"]
    random.setstate(saved["python"])
    torch.set_rng_state(saved["torch"])
    if saved["cuda"]:
        torch.cuda.set_rng_state_all(saved["cuda"])


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine to 0 at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1
                      + math.cos(math.pi * (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)))
    return 1.0


def prepare_contexts(rows, tokenizer, cfg: Config):
    """Tokenised contexts for every row; rows whose longest context exceeds max_prompt_len are skipped."""
    templates = (cfg.student_template, cfg.teacher_template, cfg.refonly_template)
    kept, too_long, marked, controls = [], 0, [], control_tokens(tokenizer)
    with progress() as bar:
        task = bar.add_task("tokenising prompts", total=len(rows))
        for i, (q, r) in enumerate(rows, 1):
            if found := [t for t in controls if t in q or t in r]:
                marked.append((i, found))
            c = build_contexts(tokenizer, q, r, templates=templates, student_thinking=cfg.student_thinking,
                               teacher_thinking=cfg.teacher_thinking)
            if max(len(c.student), len(c.teacher), len(c.refonly)) > cfg.max_prompt_len:
                too_long += 1
            else:
                kept.append(c)
            bar.advance(task)
    for i, found in marked[:3]:
        warn(f"warning: data row {i} holds the chat template's control token(s) {', '.join(found)}: in a "
             "prompt they act as controls, not text")
    if len(marked) > 3:
        warn(f"warning: {len(marked)} rows in all hold control tokens")
    if not kept:
        raise PopsdError(f"all {len(rows)} prompts are longer than max_prompt_len={cfg.max_prompt_len}")
    return kept, too_long


class Session:
    """A training run's set-up (in the order the run's random streams and checks need), its logs and saves,
    and its clean-up (signals, sampler, trackers, the folder's lock) however the run ends."""

    def __init__(self, cfg: Config):
        import transformers
        transformers.utils.logging.disable_progress_bar()  # rich bars are ours
        self.cfg, self.out = cfg, Path(cfg.out_dir)  # config.validate expanded ~
        self.lock = self.sampler = self.tracker = self.stop = self.bar = self.metrics_file = self.ahead = None
        self.rank, self.world, self.device = distributed.setup(pick_device(cfg.device))
        console.quiet = E.console.quiet = self.rank != 0  # rank 0 prints, logs and saves; every rank samples
        if cfg.batch_size % self.world:
            raise PopsdError(f"batch_size={cfg.batch_size} must be a multiple of the number of ranks "
                             f"({self.world})")
        if self.world > 1 and cfg.load_in_4bit:
            raise PopsdError("load_in_4bit is the one-GPU path: under torchrun FSDP shards bf16 weights "
                             "(load_in_4bit=false)")
        if cfg.rollout_engine == "vllm" and not cfg.rollout_server:
            from engines.vllm_engine import require_vllm
            require_vllm()  # before the run folder is touched
        ckpt = self._open_folder()
        try:
            self._set_up(ckpt)
        except BaseException:
            self.close()
            raise

    def _open_folder(self) -> Path | None:
        """Threads, warnings and the run folder, checked before anything in it changes, then locked and marked
        by rank 0 (checkpoints.py): the checkpoint to resume from, or None."""
        cfg, out = self.cfg, self.out
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.trust_remote_code:
            console.print("[bold yellow]trust_remote_code=true: code shipped with the model will run on "
                          "this machine[/]")
        ckpt = None
        if self.rank == 0:
            reads = [resolve_local(p) for p in (cfg.model, cfg.data, *cfg.eval_bench.split(",")) if p and p
                     != "tiny"]
            ckpt, self.lock = prepare_run_folder(out, dataclasses.asdict(cfg), cfg.resume, cfg.overwrite,
                                                 warn, [p for p in reads if p is not None])
        distributed.barrier()
        if self.rank != 0 and cfg.resume:
            ckpt = latest_checkpoint(out, lambda m: None)
        random.seed(cfg.seed)
        return ckpt

    def _set_up(self, ckpt: Path | None):
        cfg, out, rank, world = self.cfg, self.out, self.rank, self.world
        done = int(ckpt.name[5:]) if ckpt is not None else 0
        # nothing to run (its final adapter saved, or asked for fewer steps): the record stays as it is
        if ckpt is not None and (done > cfg.steps or done == cfg.steps and (out / "adapter").is_dir()):
            raise RunDone(f"{out} is done up to step {done} (steps={cfg.steps} asks for no more): nothing to "
                          "run, nothing changed; steps=N above it trains on")
        rows, bad = read_rows(cfg.data, cfg.data_split, (cfg.question_field, cfg.reference_field),
                              cfg.skip_bad_rows)
        guards.check_batch(cfg, len(rows), "rows")  # before the model loads
        data = {"data_rows": len(rows), "data_sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest()}
        if ckpt is not None:  # the data order is a cursor into these rows: other rows, another run
            check_data(out, data, cfg.resume_data_changed)
        local = resolve_local(cfg.model)
        # absolute: adapters name their base wherever
        path = str(local.resolve()) if local is not None else cfg.model
        if cfg.model == "tiny":
            texts = [t for qr in rows for t in qr] + [cfg.student_template, cfg.teacher_template,
                                                      cfg.refonly_template]
            path = str(build_tiny_model(out / "tiny_model", texts, cfg.seed) if rank == 0 else out
                       / "tiny_model")
            distributed.barrier()  # rank 0 builds it, the others load it
        # LoRA from cfg.seed, the same on every rank
        self.tokenizer, self.model = load_model(cfg, self.device, path)
        # the base's checksum: config.json, checkpoints, evaluations
        self.base = base_fingerprint(path, console.print)
        self.record = dataclasses.asdict(cfg) | {"base_sha256": self.base} | data
        if ckpt is not None:
            # a base replaced in its folder since: refused before anything here changes
            check_base(ckpt, self.base, path)
        if cfg.teacher == "ema":
            ema.add(self.model)
        if world > 1:
            distributed.shard_model(self.model, self.device, bf16=cfg.dtype == "bf16")
        torch.manual_seed(cfg.seed + rank)  # sampling: each rank its own completions, whatever ran before
        self.vocab = model_parts(self.model)[1].shape[0]
        if cfg.support == "topk" and cfg.topk > self.vocab:
            raise PopsdError(f"config key 'topk' must be at most the model's vocabulary size {self.vocab} "
                             f"(support=topk), got {cfg.topk}")
        self.examples, too_long = prepare_contexts(rows, self.tokenizer, cfg)
        guards.check_batch(cfg, len(self.examples), "prompts that fit max_prompt_len")
        self.benches = E.held_out_benches(cfg, rows) if cfg.eval_every else {}
        self.print_table(bad, too_long)
        # after the record: the config as given is the run's
        for key in ("max_new_tokens", "eval_max_new_tokens"):
            setattr(cfg, key, fit_new_tokens(self.model, cfg.max_prompt_len, getattr(cfg, key), key, warn))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.stream, self.start, self.saved = DataStream(len(self.examples), cfg.seed), 0, None
        self.ahead = Ahead()  # rollout_ahead=1: the next step's rollouts, sampled while a step trains
        sampling = None  # the adapter that samples the first resumed step, kept in the checkpoint instead
        if ckpt is not None:
            self.start, sampling = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler,
                                                   self.stream, cfg.seed, rank, world,
                                                   self.ahead if cfg.rollout_ahead else None)
            self.saved = self.start
            console.print(f"resumed from {ckpt} at step {self.start}")
            if cfg.rollout_ahead and self.start and self.ahead.step is None and sampling is None:
                warn(f"resume: {ckpt.name} kept neither step {self.start + 1}'s rollouts nor the adapter "
                     f"that samples them (written before popsd kept it): step {self.start + 1} samples "
                     "on-policy (policy_lag 0), where the straight run's lagged one step")
        if rank == 0:
            record_session(out, self.record, self.start)  # config.json, sessions.jsonl
            # rows and samples logged after the checkpoint go: they are redone
            trim_logs(out, self.start, warn)
        # the step-0 evaluation is done once: a run resumed from step 0 keeps the row it logged
        self.evaluated = self.start > 0 or distributed.all_sum([float(self.rank == 0 and any(
            json.loads(x).get("step") == 0 for x in _lines(out / "metrics.jsonl")))])[0] > 0
        self.tracker = Trackers(cfg.report_to if rank == 0 else "none", out, dataclasses.asdict(cfg),
                                self.start)
        self.eos, self.pad_id = eos_ids(self.model, self.tokenizer), self.tokenizer.pad_token_id
        self.sampler = make_sampler(cfg, self.model, self.tokenizer, path, self.eos, self.device, out, rank,
                                    world, warn)
        self.ahead.abort = getattr(self.sampler, "abort", None)
        self.stop, self.stalls = StopRequest(), 0
        self.catch_up = None
        if sampling is not None:  # the first step samples with the adapter one step older, as straight
            step, folder = sampling
            self.sampler.publish(step, lambda into: shutil.copytree(folder, into))
            self.catch_up = self.start  # then, before the next step's are sampled ahead: the checkpoint's
        else:  # the engine samples from this run's adapter (resumed: the checkpoint's)
            self.sampler.sync(self.model, self.start)

    def print_table(self, bad: int, too_long: int):
        """The start-up table: the fields set away from the defaults, the sizes derived from them, and what
        runs."""
        cfg = self.cfg
        sizes = derived_sizes(cfg, len(self.examples)) | {"ranks": self.world, "bad rows skipped": bad,
                                                           "over-long prompts skipped": too_long}
        if cfg.teacher == "ema":
            sizes["EMA teacher adapter"] = (f"{ema.megabytes(self.model):.1f} MB (a second LoRA, not "
                                            "trained; FSDP: sharded)")
        sizes |= runs_with(cfg)
        if cfg.rollout_engine == "graph" and not cfg.rollout_server:
            sizes["graph KV cache"] = graph_rows(cfg, self.model, self.device)[1]
        print_config(cfg, sizes, console)

    def __enter__(self):
        self.bar = progress().__enter__()
        self.metrics_file = open(self.out / "metrics.jsonl" if self.rank == 0 else os.devnull, "a")
        self.task = self.bar.add_task("training", total=self.cfg.steps, completed=self.start)
        return self

    def steps(self):
        """(step, this rank's share of the step's prompts) for every step still to run; before the first step
        of a fresh run, the evaluation of the initial policy (step 0)."""
        if self.benches and not self.evaluated:
            self.write({"step": 0, **self.evaluate(0)})
        self.t_run = time.time()
        for step in range(self.start + 1, self.cfg.steps + 1):
            self.t0, self.before = time.time(), position(self.stream)
            yield step, self.share(self.stream)

    def upcoming(self) -> list:
        """This rank's share of the next step's prompts, the data stream left where it is (steps() takes
        them)."""
        stream = self.stream
        return self.share(DataStream(stream.size, stream.seed, stream.epoch, stream.cursor))

    def share(self, stream: DataStream) -> list:
        """This rank's share of the next batch_size prompts `stream` gives (taken from it)."""
        return [self.examples[i] for i in stream.take(self.cfg.batch_size)][self.rank::self.world]

    def sampling(self, step: int, sequences: int):
        """A context for the step's sampling: yields the engine's progress callback (a bar; a line every 10 s
        on a pipe). A stop asked for meanwhile ends it (one process: under torchrun ranks sample in lockstep
        and stop at the step's end), the step is dropped and the run saved as it stood before the step."""
        return _Sampling(self, step, sequences)

    def timed(self, row: dict, key: str):
        return _Timed(row, key)

    def evaluate(self, step: int) -> dict:
        return E.in_training(step, self.sampler, self.tokenizer, self.benches, self.cfg, self.out, self.bar,
                             self.rank, self.world, self.base)

    def write(self, row: dict):
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        self.tracker.log(row)

    def log(self, row: dict, rollout: Rollout):
        """After a step: its guards (guards.health), the evaluation when due, the row in metrics.jsonl and the
        trackers, the step line, the warnings, the samples; a guard's stop comes after the row is logged."""
        cfg, step = self.cfg, row["step"]
        row |= {"time_sample": self.t_sample, "time_step": time.time() - self.t0}
        self.stalls, warned, stop_why = guards.health(row, self.stalls, self.vocab, cfg, self.saved)
        if self.benches and (step % cfg.eval_every == 0 or step == cfg.steps):
            try:
                row |= self.evaluate(step)
            except PopsdError as e:  # a full disk as its files were written: the step kept if there is room
                self.write(row)  # its training is logged (its evaluation is not)
                raise PopsdError(f"{e}; {self.keep(step, rollout)}") from None
        self.write(row)
        pace = (time.time() - self.t_run) / (step - self.start)  # seconds per step, this process so far
        console.print(step_line(row, cfg.steps, pace), soft_wrap=True)
        for warning in warned:
            console.print(f"[bold yellow]{warning}[/]", soft_wrap=True)
        if stop_why:
            raise PopsdError(stop_why)
        if self.rank == 0:
            write_samples(self.out / "samples.txt", step, rollout, self.tokenizer, cfg.samples_per_step)
        self.bar.advance(self.task)

    def save(self, step: int, rollout: Rollout):
        """A checkpoint every save_every steps, at the end, or when a stop was asked for (then exit). Every
        rank takes part: the adapter and optimizer are gathered from the shards."""
        stopping = distributed.all_sum([self.stop.signum or 0])[0] > 0  # ranks stop together
        if (self.cfg.save_every and step % self.cfg.save_every == 0) or step == self.cfg.steps or stopping:
            body, head_weight = model_parts(self.model)
            guards.check_outputs(self.model, body, head_weight, rollout, self.pad_id, step)
            self.checkpoint(step, stopping)
        if stopping:
            console.print(
                f"[yellow]checkpoint saved at step {step} in {self.out}; resume with resume=true[/]")
            sys.exit(128 + (self.stop.signum or signal.SIGTERM))

    def keep(self, step: int, rollout: Rollout | None = None) -> str:
        """After a failure at `step` (a full disk, say): a checkpoint of the step if there is room, else the
        newest one stays; what was kept, in words."""
        try:
            if rollout is not None:
                body, head_weight = model_parts(self.model)
                guards.check_outputs(self.model, body, head_weight, rollout, self.pad_id, step)
            self.checkpoint(step, stopping=True)
            return f"checkpoint saved at step {step}: resume=true continues from it"
        except (PopsdError, OSError) as e:
            kept = f"step {self.saved}" if self.saved is not None else "none yet"
            return f"no checkpoint of step {step} ({str(e).split(':')[0]}); the newest kept: {kept}"

    def checkpoint(self, step: int, stopping: bool = False):
        """A checkpoint after `step`. With rollout_ahead=1, with the next step's rollouts if they were sampled
        ahead (waited for: a resume trains on exactly them); on a stop they are aborted, and if they failed or
        never were (the last step), the checkpoint keeps the adapter that samples them instead (the one after
        step − 1): a resume samples them as the straight run did. A failure of theirs is raised after the
        checkpoint is saved."""
        ahead = failed = None
        if self.ahead.step == step + 1:
            if stopping:
                self.ahead.stop("the run is stopping")
            elif self.ahead.in_flight:
                console.print(f"[dim]waiting for step {step + 1}'s rollouts (sampled ahead) to keep them "
                              "with the checkpoint[/]")
            try:
                ahead = self.ahead.wait(step + 1)
            except Exception as e:  # failed, or stopped: the checkpoint keeps what samples them instead
                failed = None if stopping else e
        sampling = None
        if self.cfg.rollout_ahead and ahead is None and step >= 1 and self.rank == 0:
            folder = self.sampler.adapter_folder(step - 1)
            sampling = (step - 1, folder) if folder is not None else None
        save_checkpoint(self.out, step, self.model, self.optimizer, self.scheduler, self.stream,
                        self.cfg.keep_checkpoints, self.rank, self.record,
                        None if ahead is None else ahead.state(), sampling)
        self.saved = step
        if failed is not None:
            raise failed

    def finish(self):
        """The trained adapter (PEFT format, with the tokenizer and the prompt settings) and the run's
        curves."""
        weights = trainable_state(self.model)
        check_finite(weights)
        if self.rank == 0:
            save_final_adapter(self.out, self.model, self.tokenizer, weights, self.record)
            # the run folder's plots.png is the run's own (checkpoints.RUN_FILES), from this popsd or another
            (self.out / "plots.png").unlink(missing_ok=True)
            plots.plot_runs([self.out], self.out / "plots.png")

    def close(self):
        """Whatever was set up is put away, in reverse, however the run ends (the lock last: the folder is
        free)."""
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.stop is not None:
            self.stop.restore()
        if self.ahead is not None:
            self.ahead.close()  # rollouts still in flight end before the sampler closes
        if self.sampler is not None:
            self.sampler.close()
        if self.tracker is not None:
            self.tracker.close()
        if self.lock is not None:
            self.lock.release()
        self.bar = self.metrics_file = self.stop = self.sampler = self.tracker = self.lock = None

    def __exit__(self, kind, error, trace):
        self.close()
        if kind is None:
            console.print(f"done: adapter in {self.out / 'adapter'}, metrics in "
                          f"{self.out / 'metrics.jsonl'}, curves in {self.out / 'plots.png'}")
            distributed.finish()


class _Sampling:
    def __init__(self, run: Session, step: int, sequences: int):
        self.run, self.step, self.sequences, self.sampled = run, step, sequences, 0
        self.task = run.bar.add_task(f"step {step}: sampling", total=sequences)

    def on_batch(self, k: int):
        self.sampled += k
        E.advance(self.run.bar, self.task, k, end_line=False)
        if self.run.stop.signum and self.run.world == 1:
            raise SamplingStopped

    def __enter__(self):
        return self.on_batch

    def __exit__(self, kind, error, trace):
        run = self.run
        run.bar.remove_task(self.task)
        run.t_sample = time.time() - run.t0
        if kind is SamplingStopped:  # the step is dropped: the run stands where it stood before it
            go_back(run.stream, run.before)
            run.checkpoint(self.step - 1, stopping=True)
            console.print(f"[yellow]stopped while sampling step {self.step} ({self.sampled} of its "
                          f"{self.sequences} sequences sampled): checkpoint saved at step {self.step - 1} in "
                          f"{run.out}; resume with resume=true[/]")
            sys.exit(128 + (run.stop.signum or signal.SIGTERM))
        if kind is RuntimeError and "probability tensor contains" in str(error):
            raise PopsdError(f"step {self.step}: the student's next-token probabilities are not finite: the "
                             "run diverged; lower lr or max_grad_norm and resume from "
                             + (f"the last checkpoint (step {run.saved})" if run.saved is not None else
                                "the start (no checkpoint was saved)")) from None
        if kind is not None and issubclass(kind, (PopsdError, OSError, RuntimeError)) and \
                run.saved != self.step - 1:
            # the step's sampling failed (servers gone, ...): the steps trained so far are kept
            go_back(run.stream, run.before)
            kept = run.keep(self.step - 1)
            raise PopsdError(f"step {self.step} could not be sampled: {error}; {kept}") from error
        if kind is None and run.catch_up is not None:  # resumed: the engine now gets the checkpoint's
            run.sampler.sync(run.model, run.catch_up)  # adapter, before the next step's are sampled ahead
            run.catch_up = None
        if run.device.type == "cuda":
            torch.cuda.empty_cache()  # give the KV cache's blocks back before the scoring passes
        return False


class _Timed:
    def __init__(self, row: dict, key: str):
        self.row, self.key = row, key

    def __enter__(self):
        self.t0 = time.time()

    def __exit__(self, *exc):
        self.row[self.key] = time.time() - self.t0


def runs_with(cfg: Config) -> dict:
    """What the run actually runs, for the start-up table: the sampler, the loss path, the dtype, the
    threads."""
    sampler = f"server pool ({cfg.rollout_server})" if cfg.rollout_server else {
        "dynamic": "HF generate, dynamic KV cache (engines/hf.py)", "static": "HF generate, static KV cache "
        "(engines/hf.py)", "graph": f"graph sampler, keep_rows={cfg.graph_keep_rows} (engines/graph.py)",
        "vllm": "vLLM in this process (engines/vllm_engine.py)"}[cfg.rollout_engine]
    path = ("fused, chunked (plumbing/loss_fused.py)" if cfg.loss_impl == "fused"
            else "reference (loss.reference_loss)")
    return {"sampler": sampler, "loss path": path,
            "dtype": cfg.dtype + (", 4-bit nf4 base" if cfg.load_in_4bit else ""),
            "torch threads": cfg.threads or torch.get_num_threads()}


def step_line(row: dict, steps: int, pace: float | None = None) -> str:
    """One readable line per step; pace (seconds per step so far) adds the rate and the time left."""
    # 2e-5 reads, not 0.0000
    line = (f"step {row['step']:>4}/{steps}  loss {row['loss']:.2e}  lr {row['lr']:.1e}  "
            f"|g| {row['grad_norm']:.2e}  len {row['completion_len']:.0f}  ent {row['entropy']:.2f}")
    if "cos_total_ref" in row:
        line += (f"  cos(Δ,Δref) {row['cos_total_ref']:+.2f}  cos(Δ,Δit) {row['cos_total_it']:+.2f}"
                 f"  |Δref|/|Δ| {row['norm_ratio']:.2f}")
    if "sampler_logprob_gap" in row:
        line += f"  gap {row['sampler_logprob_gap']:.1e}"
    line += f"  markers {row['markers_per_1k']:.1f}/1k  {row['time_step']:.1f}s"
    if pace is None or pace <= 0:
        return line
    # as tqdm: the unit that reads above 1
    rate = f"{1 / pace:.2f} step/s" if pace <= 1 else f"{pace:.1f} s/step"
    left = round(pace * (steps - row["step"]))
    days = f"{left // 86400}d " if left >= 86400 else ""
    return line + f"  {rate}  eta {days}{time.strftime('%H:%M:%S', time.gmtime(left % 86400))}"


def printable(text: str) -> str:
    """Control characters escaped (\\x07, \\x1b, ...), newlines and tabs kept: samples.txt stays text."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode() for c in text)


def write_samples(path: Path, step: int, rollout: Rollout, tokenizer, k: int):
    with path.open("a") as f:
        for i in range(min(k, len(rollout))):
            prompt = tokenizer.decode(rollout.contexts[i].student)
            f.write(printable(f"===== step {step} sample {i}\n{prompt}{rollout.texts[i]}") + "\n\n")
