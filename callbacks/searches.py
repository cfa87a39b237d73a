"""What the channel searches share: one search per run, the groups a scope names, no trainable gates.

SNIP, Fisher pruning, ShrinkNets switches, NetAdapt and MorphNet each drive the network to their own
target by their own criterion; two in one run interfere (SNIP's masks and Fisher's gates over the same
channels fail inside a tensor operation; MorphNet and Fisher both run and meet neither target). So a run
with two is refused at fit start, naming both. To combine them, chain runs: the second starts from the
first's ``found_arch.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
from torch import Tensor

from lit_nas.protocol import NASModule, search_changes


def refuse_two_searches(trainer: L.Trainer, who: str) -> None:
    """``ValueError`` naming both when ``trainer`` holds another channel search besides ``who``."""
    # the width searches of lit_nas.protocol.ArchitectureSearch: the one definition of "which search"
    names = [type(cb).__name__ for cb in trainer.callbacks if search_changes(cb) == "width"]
    others = [n for n in names if n != who]
    if others:
        raise ValueError(
            f"{who} and {others[0]} are both channel searches; one run takes one (they drive the same "
            f"channels to different targets). Switch one off (e.g. --{_key(others[0])} null), or chain "
            "two runs: the second from the first's found_arch.yaml (--model.init_args.arch_spec)"
        )


#: which channel groups a search acts on: ``all``, or ``inner`` (the inner width of each residual cell)
GROUP_SCOPES = ("all", "inner")


def scoped_groups(module: NASModule, scope: str) -> list[str]:
    """Names of the channel groups ``scope`` names, by the role the network gave them."""
    return [g.name for g in module.channel_groups() if scope == "all" or g.role == "inner"]


def refuse_trainable_gates(who: str, gates: Mapping[str, Tensor]) -> None:
    """``ValueError`` naming the groups whose gates are trainable switches (another search's, SwitchL1)."""
    trainable = [g for g, p in gates.items() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"{who}: the gates of {trainable} are trainable switches (SwitchL1?); use one channel-pruning "
            "callback per run"
        )


def _key(name: str) -> str:
    """The command-line key of the callback class ``name`` (imported late: ``callbacks`` imports this)."""
    from callbacks import NAMED_CALLBACKS

    return next(key for key, cls in NAMED_CALLBACKS.items() if cls.__name__ == name)
