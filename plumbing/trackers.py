"""Experiment trackers (report_to=tensorboard | wandb | tensorboard,wandb): each metrics.jsonl row, sent on.

Off by default (report_to=none); a tracker's package is imported only when it is asked for.
  tensorboard  event files in <run>/tensorboard:  tensorboard --logdir runs/
  wandb        the W&B project $WANDB_PROJECT (default "popsd"), run name = the run folder's name, files in
               <run>/wandb; WANDB_MODE=offline logs without a network (wandb sync later). resume=true
               continues the same W&B run (its id is kept in <run>/wandb/popsd_run_id).
Rank 0 only; metrics.jsonl stays the record, a tracker is a view of it.
"""
import math
import os
import secrets
from pathlib import Path

from plumbing.data import PopsdError

TRACKERS = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def names(report_to: str) -> list[str]:
    """'none' → [], 'tensorboard,wandb' → both; an unknown name is an error naming it."""
    picked = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    for n in picked:
        if n not in TRACKERS:
            raise PopsdError(f"report_to: unknown tracker {n!r} (choose from none, {', '.join(TRACKERS)}; "
                             "several comma-separated)")
    return picked


class Trackers:
    def __init__(self, report_to: str, out: Path, config: dict, start: int):
        self.writers = []
        for name in names(report_to):
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter
                    # purge_step: a resumed run drops the events logged after its checkpoint (they are
                    # replayed)
                    self.writers.append(("tensorboard", SummaryWriter(str(out / "tensorboard"),
                                                                      purge_step=start + 1 if start
                                                                      else None)))
                else:
                    import wandb
                    self.writers.append(("wandb", open_wandb(wandb, out, config, start)))
            except ImportError as e:
                self.close()
                raise PopsdError(f"report_to={name} needs its package ({e}): {INSTALL[name]}") from None
            except Exception as e:  # W&B: no login, no network, a refused project
                if name != "wandb" or not isinstance(e, __import__("wandb").errors.Error):
                    raise
                self.close()
                raise PopsdError(f"report_to=wandb could not start a W&B run ({str(e).splitlines()[0]}): log "
                                 "in with `wandb login`, or set WANDB_MODE=offline to log without a login or "
                                 "a network (`wandb sync` sends it later)") from None

    def log(self, row: dict):
        scalars = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        for name, w in self.writers:
            if name == "tensorboard":
                for k, v in scalars.items():
                    w.add_scalar(k, v, row["step"])
                w.flush()
            else:
                w.log(scalars, step=row["step"])

    def close(self):
        for name, w in self.writers:
            w.close() if name == "tensorboard" else w.finish()
        self.writers = []


def open_wandb(wandb, out: Path, config: dict, start: int):
    folder = out / "wandb"
    folder.mkdir(exist_ok=True)
    id_file = folder / "popsd_run_id"
    if folder.is_symlink() or id_file.is_symlink():
        raise PopsdError(f"{id_file} is a symbolic link: a run writes only inside its folder; remove it")
    # W&B's id form: 8 lowercase letters/digits
    run_id = id_file.read_text().strip() if start and id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "popsd"), name=out.name, id=run_id,
                      resume="allow", dir=str(out), config=config)
