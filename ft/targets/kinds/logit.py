"""Class logits of a fine-tuned sequence classifier: one target per class (`target.classes`, ids or
label names), the objective that class's logit from the checkpoint's own head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from ft.core.errors import TargetError
from ft.core.typed import Unique
from ft.targets.base import Target, refuse_empty
from ft.targets.objectives import Objective
from ft.targets.registry import BuildContext, RebuildContext, UnitKind, register


def logit_targets(encoder, classes: Sequence[int | str] | None) -> list[Target]:
    """One target per class of a fine-tuned sequence classifier (ids, or label names from its
    `id2label`): the objective is that class's logit from the checkpoint's own head."""
    from ft.targets.objectives import ClassLogit

    head = getattr(encoder, "head", None)
    kind = type(head).__name__ if head is not None else None
    if head is None or not kind.endswith("ForSequenceClassification"):
        raise TargetError(f"target=logits needs a fine-tuned sequence classifier; {encoder.name!r} is "
                          f"{kind or 'a bare encoder'}; valid: a *ForSequenceClassification checkpoint")
    id2label = {int(i): str(n) for i, n in (head.config.id2label or {}).items()}
    n = int(head.config.num_labels)
    by_name = {v: k for k, v in id2label.items()}
    refuse_empty("target.classes", classes)
    chosen = []
    for c in list(classes) if classes is not None else list(range(n)):
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < n:
            chosen.append(c)
        elif isinstance(c, str) and c in by_name:
            chosen.append(by_name[c])
        elif isinstance(c, str) and c.isdigit() and int(c) < n:
            chosen.append(int(c))
        else:
            raise TargetError(f"target.classes: {c!r} is not a class of {encoder.name!r}; valid: ids 0..{n - 1} or "
                              f"labels {[id2label.get(i, str(i)) for i in range(n)]}")
    return [Target("logit", ClassLogit(head, c, id2label.get(c, str(c))), spec=f"logit.{c}",
                   target_class=c, meta={"label": id2label.get(c, str(c))}) for c in chosen]


@register
class LogitKind(UnitKind):
    name = "logit"
    option = "logits"
    summary_line = "a sequence classifier's class logits (target.classes: ids or labels; all by default)"
    keys = {"classes": Annotated[list[int | str], Unique] | None}
    word_stats = "classifier"  # no sites: every word goes through the classifier
    token_examples = False  # a sequence's score, not a token's
    one_layer = False

    def build(self, ctx: BuildContext) -> list[Target]:
        return logit_targets(ctx.encoder, ctx.cfg.target.classes)

    def rebuild(self, row: Any, ctx: RebuildContext) -> Objective:
        raise TargetError("class logit targets are rebuilt from the classifier (ft.targets.logit_targets), "
                          "not from a targets table")

    def label(self, t: Target) -> str:
        return f"{t.spec} ({t.meta['label']})" if t.meta.get("label") is not None else str(t.spec)
