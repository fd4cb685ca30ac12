// The bench rule in C: the twin of plugins/rules/bench-three-fields.
//
// It reads the kind, the action and `/repository/full_name` through `get`, and
// returns one medium route to agent `bench` with the reason
// "{kind}.{action or -} in {repo or ?}". Keep it doing exactly that: every
// language's twin must give the same decisions (tests/it/languages.rs).
//
// `rule.h` is generated from the WIT by `wit-bindgen c` at build time. No
// stdio: wasi-libc then imports no WASI at all.

#include <stdlib.h>
#include <string.h>

#include "rule.h"

// Appends `n` bytes at `*at`, returning the new end.
static uint8_t *put(uint8_t *at, const void *bytes, size_t n) {
    memcpy(at, bytes, n);
    return at + n;
}

bool exports_sluice_router_classifier_classify(exports_sluice_router_classifier_own_event_t ev,
                                               exports_sluice_router_classifier_decision_t *ret,
                                               rule_string_t *err) {
    (void)err;
    sluice_router_types_borrow_event_t event = sluice_router_types_borrow_event(ev);

    rule_string_t kind;
    sluice_router_types_method_event_kind(event, &kind);
    rule_string_t action;
    bool has_action = sluice_router_types_method_event_action(event, &action);
    rule_string_t pointer;
    rule_string_set(&pointer, "/repository/full_name");
    sluice_router_types_value_t value;
    bool has_value = sluice_router_types_method_event_get(event, &pointer, &value);
    bool has_repo = has_value && value.tag == SLUICE_ROUTER_TYPES_VALUE_TEXT;

    // The event arrives owned: release it before returning (a handle still
    // held when the call ends traps).
    sluice_router_types_event_drop_own(ev);

    // "{kind}.{action or -} in {repo or ?}"
    size_t action_len = has_action ? action.len : 1;
    size_t repo_len = has_repo ? value.val.text.len : 1;
    size_t len = kind.len + 1 + action_len + 4 + repo_len;
    uint8_t *reason = malloc(len);
    if (reason == NULL) abort();
    uint8_t *at = put(reason, kind.ptr, kind.len);
    at = put(at, ".", 1);
    at = has_action ? put(at, action.ptr, action.len) : put(at, "-", 1);
    at = put(at, " in ", 4);
    at = has_repo ? put(at, value.val.text.ptr, value.val.text.len) : put(at, "?", 1);

    rule_string_free(&kind);
    if (has_action) rule_string_free(&action);
    if (has_value) sluice_router_types_value_free(&value);

    // Everything returned is freed by the bindings after the host copied it.
    sluice_router_types_route_t *route = calloc(1, sizeof *route);
    if (route == NULL) abort();
    rule_string_dup(&route->agent, "bench");
    route->workflow.is_some = false;
    route->priority = SLUICE_ROUTER_TYPES_PRIORITY_MEDIUM;
    route->reason.ptr = reason;
    route->reason.len = len;
    route->labels.ptr = NULL;
    route->labels.len = 0;

    ret->tag = SLUICE_ROUTER_TYPES_DECISION_ROUTES;
    ret->val.routes.ptr = route;
    ret->val.routes.len = 1;
    return true;
}
