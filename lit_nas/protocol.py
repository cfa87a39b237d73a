"""The small typed surface through which callbacks reach the model.

Callbacks never poke at layer names or private attributes: they call these members, and check in ``setup``
that the LightningModule they were given has them (:func:`require_nas_module`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol, cast, runtime_checkable

from torch import Tensor, nn

from lit_nas.arch import ArchSpec
from lit_nas.cost import CostReport
from lit_nas.nets.base import ChannelGroup, ExitLogits, MultiExitNet

#: An extra loss term: ``fn(images, targets, outputs) -> scalar``, added to the training loss every step.
LossTerm = Callable[[Tensor, Tensor, ExitLogits], Tensor]


@runtime_checkable
class NASModule(Protocol):
    """What a LightningModule offers to lit_nas callbacks (implemented by ``MultiExitModule``)."""

    net: MultiExitNet

    @property
    def arch_spec(self) -> ArchSpec:
        """The current architecture (saved in every checkpoint)."""
        ...

    def set_arch_spec(self, spec: ArchSpec, rebuild: bool = False) -> None:
        """Record a changed architecture; ``rebuild`` builds a fresh network from it (new weights)."""
        ...

    @property
    def active_blocks(self) -> int:
        """Number of blocks currently computed."""
        ...

    def set_active_blocks(self, n: int) -> None:
        """Activate blocks ``0..n-1`` (inactive ones are skipped in forward and backward)."""
        ...

    def prunable_weights(self, include_exits: bool = False) -> dict[int, dict[str, nn.Parameter]]:
        """Conv and linear weights grouped by block, by qualified parameter name."""
        ...

    def channel_groups(self) -> list[ChannelGroup]:
        """Channels that must be pruned together."""
        ...

    def costs(self) -> CostReport:
        """FLOPs and parameters per block and exit of the current network (all blocks)."""
        ...

    def exit_weights(self) -> dict[int, float]:
        """Weight of each active exit's loss in the training loss at the current epoch."""
        ...

    def masks(self) -> dict[str, Tensor]:
        """Weight masks (1 kept, 0 pruned) by parameter name; only masked parameters appear."""
        ...

    def set_masks(self, masks: dict[str, Tensor]) -> None:
        """Set and apply the masks of the named parameters; they stay applied for the rest of training."""
        ...

    def set_search_pending(self, who: str, pending: bool) -> None:
        """Whether callback ``who`` will still change the architecture (model selection waits for it)."""
        ...

    def pending_searches(self) -> frozenset[str]:
        """Names of the callbacks that will still change the architecture."""
        ...

    def add_loss_term(self, name: str, fn: LossTerm) -> None:
        """Add ``fn``'s value to the training loss (logged under ``name``)."""
        ...

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Log a metric (``LightningModule.log``)."""
        ...

    def remove_loss_term(self, name: str) -> None:
        """Remove a term added with :meth:`add_loss_term`."""
        ...


#: what an architecture search changes: ``depth`` adds blocks (growing), ``width`` chooses the channels or
#: weights kept (SNIP, Fisher, ShrinkNets switches, NetAdapt, MorphNet)
SearchChanges = Literal["depth", "width"]


@runtime_checkable
class ArchitectureSearch(Protocol):
    """A callback that changes the architecture while it trains: a growth or a width search.

    One definition for the three places that ask "which callbacks search?": ``RunSummary`` books the
    training time before a retraining as search time when one is present, ``RetrainFromScratch`` refuses to
    restart before the last one ends, and a study's baselines switch off the ``width`` ones.
    """

    #: what it changes (``depth`` or ``width``)
    changes: ClassVar[SearchChanges]

    def last_search_epoch(self) -> float | None:
        """The last epoch at which it changes the network.

        Returns:
            A whole epoch number; ``math.inf`` when it changes the network up to the end of training; or
            ``None`` when that is not known in advance (it stops once its target is met).
        """
        ...


def search_changes(cls_or_callback: object) -> SearchChanges | None:
    """What a callback (or callback class) implementing :class:`ArchitectureSearch` changes; else ``None``."""
    cls = cls_or_callback if isinstance(cls_or_callback, type) else type(cls_or_callback)
    if not callable(getattr(cls, "last_search_epoch", None)):
        return None
    return getattr(cls, "changes", None)


_MEMBERS = (
    "net",
    "arch_spec",
    "set_arch_spec",
    "active_blocks",
    "set_active_blocks",
    "prunable_weights",
    "channel_groups",
    "costs",
    "exit_weights",
    "masks",
    "set_masks",
    "set_search_pending",
    "pending_searches",
    "add_loss_term",
    "remove_loss_term",
    "log",
)


def require_nas_module(pl_module: object, who: str) -> NASModule:
    """Return ``pl_module`` typed as :class:`NASModule`, or raise ``TypeError`` naming what is missing.

    Args:
        pl_module: the LightningModule a callback was attached to.
        who: the callback's name, for the message.
    """
    missing = [m for m in _MEMBERS if not hasattr(pl_module, m)]
    if missing:
        raise TypeError(
            f"{who} needs a lit_nas model (lit_nas.MultiExitModule or anything implementing "
            f"lit_nas.protocol.NASModule); {type(pl_module).__name__} lacks {missing}"
        )
    return pl_module  # type: ignore[return-value]


def nas(pl_module: object) -> NASModule:
    """``pl_module`` typed as :class:`NASModule`, in hooks after ``setup`` checked it (no check here)."""
    return cast(NASModule, pl_module)
