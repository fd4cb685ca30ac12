"""The bench rule in Python: the twin of plugins/rules/bench-three-fields.

It reads the kind, the action and `/repository/full_name` through `get`, and
returns one medium route to agent `bench` with the reason
"{kind}.{action or -} in {repo or ?}". Keep it doing exactly that: every
language's twin must give the same decisions (tests/it/languages.rs).
"""

from wit_world import exports
from wit_world.imports import types


class Classifier(exports.Classifier):
    def classify(self, ev: types.Event) -> types.Decision:
        # The event arrives owned: release it before returning.
        with ev:
            kind = ev.kind()
            action = ev.action()
            repo = ev.get("/repository/full_name")
        repo = repo.value if isinstance(repo, types.Value_Text) else None
        reason = "{}.{} in {}".format(
            kind,
            "-" if action is None else action,
            "?" if repo is None else repo,
        )
        route = types.Route(
            agent="bench",
            workflow=None,
            priority=types.Priority.MEDIUM,
            reason=reason,
            labels=[],
        )
        return types.Decision_Routes([route])
