"""What a run keeps besides its final model: weight snapshots at chosen epochs (snapshot
ensembles, Huang et al. 2017) and the stochastic weight average (SWA, Izmailov et al. 2018).

Both come from epoch ends, so they cost a copy or one foreach average per epoch, never a
step's time. SWA uses torch.optim.swa_utils as its authors' recipe does: `AveragedModel`
averages the parameters at the end of every epoch from `swa.start_epoch` on; with `swa.lr`
set, `SWALR` takes the learning rate over from that epoch (created then, so that until then
the run is exactly the run without SWA); at the end `update_bn` recomputes the BatchNorm
statistics over the training images, which the averaged weights never saw together. All of
it is in the checkpoint, so a resumed run keeps the same snapshots and average, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from ..compute.inference import normalized_batches
from ..config.spec import TrainingSpec


def _cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


class KeptWeights:
    def __init__(self, spec: TrainingSpec, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.snapshot_epochs = frozenset(spec.snapshot_epochs)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.swa = spec.swa if spec.swa.enabled else None
        self.average = AveragedModel(model) if self.swa is not None else None
        self.optimizer = optimizer
        self.swa_scheduler: SWALR | None = None

    def swa_lr_from(self, epoch: int) -> bool:
        """Whether SWALR sets the learning rate of epoch `epoch` (0-based) and after."""
        return self.swa is not None and self.swa.lr is not None and epoch + 1 >= self.swa.start_epoch

    def start_epoch(self, epoch: int) -> None:
        """Before epoch `epoch` (0-based) trains: SWALR takes over at the first SWA epoch."""
        if self.swa_scheduler is None and self.swa_lr_from(epoch):
            # Created now, it keeps the current lr and anneals from it (swa_utils' get_lr at step 0).
            self.swa_scheduler = self._swalr()

    @torch.no_grad()
    def end_epoch(self, epoch: int, model: nn.Module, final_model: nn.Module) -> None:
        """After epoch `epoch` (1-based): keep its snapshot, add it to the average, anneal SWA's lr."""
        if epoch in self.snapshot_epochs:
            self.snapshots[epoch] = _cpu_copy(final_model)
        if self.average is not None and epoch >= self.swa.start_epoch:
            self.average.update_parameters(model)
        if self.swa_scheduler is not None:
            self.swa_scheduler.step()

    def _swalr(self) -> SWALR:
        return SWALR(self.optimizer, swa_lr=self.swa.lr, anneal_epochs=self.swa.anneal_epochs,
                     anneal_strategy="cos")

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict | None:
        if not self.snapshot_epochs and self.average is None:
            return None
        return {"snapshots": {str(e): s for e, s in self.snapshots.items()},
                "average": self.average.state_dict() if self.average is not None else None,
                "swa_scheduler": self.swa_scheduler.state_dict() if self.swa_scheduler is not None else None}

    def misfit(self, state, epochs_done: int) -> str | None:
        """Why a checkpoint's kept weights cannot be this run's after `epochs_done` epochs (None:
        they fit)."""
        if (state is None) != (self.state_dict() is None):
            return "its kept weights do not fit this run"
        if state is None:
            return None
        if not isinstance(state, dict) or set(state) != {"snapshots", "average", "swa_scheduler"}:
            return "its kept weights are not snapshots, average and swa_scheduler"
        snapshots = state["snapshots"]
        if not isinstance(snapshots, dict) or not all(
                isinstance(k, str) and k.isdigit() and isinstance(v, dict) for k, v in snapshots.items()):
            return "its snapshots are not weights by epoch"
        if {int(k) for k in snapshots} != {e for e in self.snapshot_epochs if e <= epochs_done}:
            return "its snapshots are not those of this run's epochs so far"
        average = state["average"]
        if (average is None) != (self.average is None) or not isinstance(average, dict | None):
            return "its SWA average does not fit this run"
        if not isinstance(state["swa_scheduler"], dict | None):
            return "its SWA schedule is not a scheduler state"
        return None

    def prepare_restore(self, state: dict | None) -> None:
        """Before the optimizer's state is restored: SWALR exists when the checkpoint had one
        (creating it writes into the optimizer's param groups, which the restore then overwrites)."""
        if state and state.get("swa_scheduler") is not None and self.swa_scheduler is None:
            self.swa_scheduler = self._swalr()

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.snapshots = {int(e): s for e, s in state["snapshots"].items()}
        if self.average is not None and state.get("average") is not None:
            self.average.load_state_dict(state["average"])
        if self.swa_scheduler is not None and state.get("swa_scheduler") is not None:
            self.swa_scheduler.load_state_dict(state["swa_scheduler"])

    # ------------------------------------------------------------ results
    def swa_model(self, images, mean, std, device: torch.device, batch_size: int,
                  channels_last: bool) -> nn.Module:
        """The averaged network with BatchNorm statistics recomputed over `images` (the training
        split, unaugmented, in order: deterministic), in float32, in batches of `batch_size`: the
        statistics are the mean over batches of each batch's (train-mode BatchNorm normalizes
        every layer's input by its batch), so the training batch size, a result setting."""
        module = self.average.module
        with torch.no_grad():
            update_bn(normalized_batches(images, mean, std, device, batch_size, channels_last), module)
        return module

    def members(self) -> dict[str, dict[str, torch.Tensor]]:
        """The snapshots as members named by epoch (`epoch12`), in epoch order."""
        return {f"epoch{e}": self.snapshots[e] for e in sorted(self.snapshots)}
