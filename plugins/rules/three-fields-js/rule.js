// The bench rule in JavaScript: the twin of plugins/rules/bench-three-fields.
//
// It reads the kind, the action and `/repository/full_name` through `get`, and
// returns one medium route to agent `bench` with the reason
// "{kind}.{action or -} in {repo or ?}". Keep it doing exactly that: every
// language's twin must give the same decisions (tests/it/languages.rs).
//
// Built by componentize-qjs (QuickJS). WIT mapping: option<T> is the value or
// null, a variant is { tag, val }, an enum is its case name, an `err` result is
// a thrown string.

export const classifier = {
  classify(ev) {
    // The event arrives owned: release it before returning.
    let kind, action, repo;
    try {
      kind = ev.kind();
      action = ev.action();
      const v = ev.get("/repository/full_name");
      repo = v !== null && v !== undefined && v.tag === "text" ? v.val : null;
    } finally {
      ev[Symbol.dispose]();
    }
    return {
      tag: "routes",
      val: [
        {
          agent: "bench",
          workflow: null,
          priority: "medium",
          reason: `${kind}.${action ?? "-"} in ${repo ?? "?"}`,
          labels: [],
        },
      ],
    };
  },
};
