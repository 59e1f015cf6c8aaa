"""An ensemble of one network fine-tuned under several seeds, whose shared frozen layers run once.

Only torch is needed, so a served model's consumers load it with the model's own requirements.
"""

from __future__ import annotations

import torch


class SeedEnsemble(torch.nn.Module):
    """Networks of one timm EfficientNet architecture, fine-tuned from the same ImageNet weights
    under different seeds (``members``) or taken from one run at the ends of its cosine cycles
    (``snapshots``); the model's class probabilities are the mean of theirs.

    The stem and the first ``shared`` blocks were frozen in training, so every member holds the
    same weights there: they run once per batch, on the first member, and each member runs only
    the rest. Each member keeps its own (equal) copy of those layers, so each stays a whole timm
    model that Grad-CAM and the detector's backbone take as it is.

    :meth:`forward` returns the log of the mean probabilities: their softmax is the mean
    probabilities again, so every caller that takes the softmax of a network's output scores the
    ensemble unchanged.

    Args:
        members: the networks, in seed order (at least two).
        shared: how many leading blocks (with the stem) the members share; 0: none.

    Raises:
        ValueError: fewer than two members, or members whose shared layers differ.
    """

    def __init__(self, members: list[torch.nn.Module], shared: int) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        self.members = torch.nn.ModuleList(members)
        # In the state dict, so a loaded ensemble knows which layers it may run once.
        self.register_buffer("shared", torch.tensor(shared, dtype=torch.int64))
        self.check_shared()

    def _shared_layers(self, member: torch.nn.Module) -> dict[str, torch.Tensor]:
        depth = int(self.shared)
        if not depth:
            return {}
        names = ("conv_stem", "bn1", *(f"blocks.{i}" for i in range(depth)))
        return {f"{name}.{key}": value for name in names for key, value in member.get_submodule(name).state_dict().items()}

    def check_shared(self) -> None:
        """Raises ``ValueError`` when a member's shared layers are not the first member's, tensor for tensor."""
        first = self._shared_layers(self.members[0])
        for number, member in enumerate(self.members[1:], start=2):
            own = self._shared_layers(member)
            differ = [k for k in first if k not in own or not torch.equal(first[k], own[k])]
            if differ:
                raise ValueError(
                    f"member {number}'s frozen layers differ from member 1's (first: {differ[0]}), so they cannot run "
                    "once for all: train the members with the same frozen layers from the same weights"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depth, first = int(self.shared), self.members[0]
        features = first.blocks[:depth](first.bn1(first.conv_stem(x))) if depth else x
        probs = torch.stack([self._rest(member, features, depth).float().softmax(1) for member in self.members]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    @staticmethod
    def _rest(member: torch.nn.Module, features: torch.Tensor, depth: int) -> torch.Tensor:
        if not depth:
            return member(features)
        return member.forward_head(member.bn2(member.conv_head(member.blocks[depth:](features))))


def ensemble_size(state: dict[str, torch.Tensor]) -> int:
    """How many members a saved state dict holds: 0 for one plain network."""
    indices = {int(key.split(".")[1]) for key in state if key.startswith("members.")}
    return max(indices) + 1 if indices else 0
