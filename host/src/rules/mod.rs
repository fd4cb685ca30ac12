//! The rule runtime (the router lands with the rule-runtime issue).

use serde::Deserialize;

/// The `[rules]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {}
