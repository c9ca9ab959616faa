"""engines/ahead.py: rollout_ahead=1, the next step's rollouts sampled while this step trains.

Synchronously, the servers wait while the trainer scores and updates, and the trainer waits while they
sample. One step ahead, right after step t's rollouts arrive, a thread asks the servers for step t+1's:
its prompts and seeds are known already (the data order and the request seeds never depend on the
weights), and the servers sample them with the adapter they hold, the one after step t − 1, while the
trainer scores and updates step t. Step t+1 then trains on completions from weights one optimizer step
older than the student it trains (Rollout.policy_lag: 1), and its sampler_logprob_gap compares the engine's
log-probs with that student's, so it holds the one step's change on top of the engine's precision.

A checkpoint keeps the rollouts sampled ahead for the step after it (waiting for them if they are still
coming): a resumed run trains on exactly what the straight run trained on, and samples the step after with
the same adapter the straight run's servers held then. A checkpoint saved without them (a stop, a failure
while they were sampled, the run's last step) keeps the adapter that samples them instead, one step older
than its own, and a resumed run samples that step with it, the same seeds and policy_lag 1, as the straight
run did. docs/engines.md says why this loss needs no importance correction for the lag.
"""
import contextlib
import threading

from rollout import Rollout


class Ahead:
    """At most one step's rollouts in flight (or restored from a checkpoint): start(), then take()."""

    def __init__(self, abort=None):
        self.abort = abort  # abort(why): ends the engine's requests in flight (a run that stops)
        self.step = self.thread = self.rollout = self.error = self.prompts = self.pin = None

    def start(self, step: int, draw, sampler, *args):
        """draw(sampler, *args) -> Rollout, in a thread: the rollouts of `step`, sampled while the trainer
        works, with the adapter the sampler holds now (pinned here, in the loop's thread: a sync that runs
        before the thread gets going does not change it)."""
        pin = sampler.pin() if hasattr(sampler, "pin") else None

        def work():
            try:
                with sampler.pinned(pin) if pin is not None else contextlib.nullcontext():
                    self.rollout = draw(sampler, *args)
            except BaseException as e:  # raised in the loop's thread, by take() or wait()
                self.error = e
        self.step, self.rollout, self.error, self.prompts, self.pin = step, None, None, None, pin
        self.thread = threading.Thread(target=work, name=f"popsd-rollouts-step-{step}", daemon=True)
        self.thread.start()

    def restore(self, step: int, state: dict):
        """The rollouts of `step` as a checkpoint kept them (Rollout.state)."""
        state = dict(state)
        self.prompts = state.pop("prompts")
        self.step, self.rollout, self.error, self.thread = step, Rollout(**state), None, None

    @property
    def in_flight(self) -> bool:
        """Rollouts still being sampled."""
        return self.thread is not None and self.thread.is_alive()

    def wait(self, step: int, on_batch=None) -> Rollout | None:
        """The rollouts sampled ahead for `step` (waiting for them), or None if none were. on_batch(0): the
        loop's progress callback, called while waiting, at least every 0.2 s; what it raises (a stop) ends
        the wait."""
        if self.step != step:
            return None
        while self.in_flight:
            self.thread.join(0.2)
            if on_batch is not None:
                on_batch(0)
        self.thread = None
        if self.error is not None:
            error, self.step = self.error, None
            raise error
        return self.rollout

    def take(self, step: int, batch, on_batch=None) -> Rollout | None:
        """wait(step), handed over with each row's contexts from `batch` (the loop's share of the step's
        prompts); None if nothing was sampled ahead for it, or a restored batch was sampled for other
        prompts (a resume with another batch size or number of ranks: the step is sampled anew)."""
        rollout = self.wait(step, on_batch)
        self.step = None
        if rollout is None:
            return None
        n = len(rollout) // max(len(batch), 1)
        contexts = [c for c in batch for _ in range(n)]
        if self.prompts is not None and self.prompts != [c.student for c in contexts]:
            return None
        rollout.contexts = contexts
        return rollout

    def stop(self, why: str):
        """Rollouts in flight end now (their requests aborted); wait() then raises their error."""
        if self.in_flight and self.abort is not None:
            self.abort(why)
            self.thread.join(timeout=30)

    def close(self):
        """A run that ends with rollouts in flight (an error, a stop): the engine's requests end now."""
        self.stop("the run stopped")
        self.step = self.thread = None
