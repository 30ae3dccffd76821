"""An item's consensus label and status from its annotations (and a reviewer's resolution)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from gristmill.labeling.domain.model import Consensus, ItemStatus, Project


@dataclass(frozen=True)
class ConsensusResult:
    status: ItemStatus
    consensus: Consensus


@dataclass(frozen=True)
class ConsensusRule:
    """How one project decides an item's consensus: the stores apply it, inside the transaction that changes
    the item's annotations, so status and consensus never disagree with the annotations stored."""

    required: int
    multi_label: bool

    @classmethod
    def of(cls, project: Project) -> ConsensusRule:
        return cls(required=project.settings.annotations_per_item, multi_label=project.task_type.multi_label)

    def decide(
        self, labelings: Sequence[Sequence[str]], *, resolved_labels: Sequence[str] | None = None, resolved_by: str = ""
    ) -> ConsensusResult:
        return compute_consensus(
            labelings,
            required=self.required,
            multi_label=self.multi_label,
            resolved_labels=resolved_labels,
            resolved_by=resolved_by,
        )


def compute_consensus(
    labelings: Sequence[Sequence[str]],
    *,
    required: int,
    multi_label: bool,
    resolved_labels: Sequence[str] | None = None,
    resolved_by: str = "",
) -> ConsensusResult:
    """Status and consensus of one item.

    - A reviewer's resolution wins over any vote (RESOLVED).
    - Fewer annotations than ``required``: UNLABELED, no consensus yet.
    - Single-label: the most frequent label if it is the only one with that count (LABELED), else a tie
      (CONFLICT, ``tied``).
    - Multi-label: each label is kept when more than half of the annotations chose it; a label chosen by
      exactly half is a tie (CONFLICT, ``tied``); no label with a majority is a disagreement (CONFLICT).

    ``agreement`` is the fraction of annotations whose labels equal the consensus labels.
    """
    sets = [tuple(sorted(set(labels))) for labels in labelings]
    if resolved_labels is not None:
        final = tuple(resolved_labels) if not multi_label else tuple(sorted(set(resolved_labels)))
        return ConsensusResult(
            ItemStatus.RESOLVED,
            Consensus(labels=final, agreement=_agreement(sets, final, multi_label), resolved_by=resolved_by),
        )
    if len(sets) < required or not sets:
        return ConsensusResult(ItemStatus.UNLABELED, Consensus())
    if not multi_label:
        votes = Counter(labels[0] for labels in sets if labels)
        ranked = votes.most_common()
        top = ranked[0][1]
        winners = [label for label, count in ranked if count == top]
        if len(winners) > 1:
            return ConsensusResult(ItemStatus.CONFLICT, Consensus(agreement=top / len(sets), tied=True))
        winner = (winners[0],)
        return ConsensusResult(ItemStatus.LABELED, Consensus(labels=winner, agreement=top / len(sets)))
    votes = Counter(label for labels in sets for label in labels)
    total = len(sets)
    tied = any(count * 2 == total for count in votes.values())
    chosen = tuple(sorted(label for label, count in votes.items() if count * 2 > total))
    if tied or not chosen:
        return ConsensusResult(ItemStatus.CONFLICT, Consensus(agreement=0.0, tied=tied))
    return ConsensusResult(ItemStatus.LABELED, Consensus(labels=chosen, agreement=_agreement(sets, chosen, True)))


def _agreement(sets: Sequence[tuple[str, ...]], final: tuple[str, ...], multi_label: bool) -> float:
    if not sets:
        return 0.0
    target = tuple(sorted(set(final))) if multi_label else final[:1]
    return sum(1 for labels in sets if labels == target) / len(sets)
