"""Training one model for one (experiment, seed): components, inputs, the step, checkpoints
and the epoch loop, one module each; `stages.train` writes the results to files."""

from .trainer import Diverged, Preempted, Trainer

__all__ = ["Diverged", "Preempted", "Trainer"]
