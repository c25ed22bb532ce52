"""The worker: reads the bus, frames each stream's events, steps the learner, replies, checkpoints.

``loop.Worker`` runs the tick loop; ``batcher`` turns a tick's packets into one batched learner step;
``streams`` keeps each stream's state row; ``checkpoints`` saves and restores all of it atomically;
``recovery`` replays the bus after a restart so every packet is applied exactly once.
"""

from service.worker.loop import Worker

__all__ = ["Worker"]
