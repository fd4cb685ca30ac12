//! Normalisation (placeholder until intake lands).
