//! The rule runtime (in progress).
