//! Secrets: loaded from env vars or files, generated on request, never shown.
//!
//! A [`Secret`] has no `Display` and a redacted `Debug`, so it cannot end up in
//! a log line or an error by accident. Errors name the config key and the env
//! var or file, never the value.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::config::{Config, SecretSpec};
use crate::event::Provider;

/// A secret value. `Debug` prints `Secret(<redacted>)`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps raw bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    /// The raw bytes, for keying a MAC or signing a request.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A secret that could not be loaded; names the key and where it was looked for.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {key}: {message}")]
pub struct SecretError {
    /// The config file.
    pub origin: String,
    /// The config key (`sources.github.secret`).
    pub key: String,
    /// What went wrong, naming the env var or file but never a value.
    pub message: String,
}

/// Whether generating a missing secret file is allowed (serve, send) or not (check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generate {
    /// Create the file when it does not exist yet.
    IfMissing,
    /// Create nothing: a generated file that does not exist yet is reported as
    /// [`SecretOrigin::ToGenerate`] with a throwaway value (for `sluice check`).
    Preview,
}

/// Where a secret came from, for `sluice check` and startup logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretOrigin {
    /// An environment variable (its name).
    Env(String),
    /// A file named in the config.
    File(PathBuf),
    /// A generated file under the data dir; `true` when it was created just now.
    Generated(PathBuf, bool),
    /// A file `serve` will generate; nothing was created.
    ToGenerate(PathBuf),
}

/// A loaded secret with its origin.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The value.
    pub secret: Secret,
    /// Where it came from.
    pub origin: SecretOrigin,
}

/// The file a generated secret lives in.
pub fn generated_path(config: &Config, source: &str, role: &str) -> PathBuf {
    config
        .data_dir()
        .join("secrets")
        .join(format!("{source}{role}.key"))
}

/// Loads every secret of one list (`sources.NAME.secret[s]` or `.signing_secrets`).
///
/// `role` is `""` for the primary secrets and `".signing"` for GitLab signing
/// tokens; it keeps their generated files apart.
pub fn load_all(
    config: &Config,
    source: &str,
    key: &str,
    role: &str,
    provider: Provider,
    specs: &[SecretSpec],
    generate: Generate,
) -> Result<Vec<Loaded>, SecretError> {
    let mut out = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let key = if specs.len() > 1 {
            format!("{key}[{i}]")
        } else {
            key.to_string()
        };
        let err = |message: String| SecretError {
            origin: config.origin.clone(),
            key: key.clone(),
            message,
        };
        let loaded = if let Some(var) = spec
            .env
            .as_deref()
            .filter(|v| std::env::var_os(v).is_some() || !spec.generate)
        {
            let value = std::env::var(var)
                .map_err(|_| err(format!("env var {var} is not set (or not UTF-8)")))?;
            let value = value.trim();
            if value.is_empty() {
                return Err(err(format!("env var {var} is empty")));
            }
            Loaded {
                secret: Secret::new(value.as_bytes()),
                origin: SecretOrigin::Env(var.to_string()),
            }
        } else if let Some(file) = &spec.file {
            let path = config.resolve(file);
            let secret = read_file(&path)
                .map_err(|m| err(format!("secret file {}: {m}", path.display())))?;
            Loaded {
                secret,
                origin: SecretOrigin::File(path),
            }
        } else {
            let path = generated_path(config, source, role);
            match read_file(&path) {
                Ok(secret) => Loaded {
                    secret,
                    origin: SecretOrigin::Generated(path, false),
                },
                Err(_) if generate == Generate::IfMissing && !path.exists() => {
                    let secret = create_generated(&path, provider, role)
                        .map_err(|m| err(format!("cannot generate {}: {m}", path.display())))?;
                    Loaded {
                        secret,
                        origin: SecretOrigin::Generated(path, true),
                    }
                }
                Err(_) if generate == Generate::Preview && !path.exists() => {
                    let value = fresh_value(provider, role).map_err(err)?;
                    Loaded {
                        secret: Secret::new(value.into_bytes()),
                        origin: SecretOrigin::ToGenerate(path),
                    }
                }
                Err(m) => {
                    let hint = if path.exists() {
                        m
                    } else {
                        "not generated yet (run `sluice serve` once)".into()
                    };
                    return Err(err(format!("generated secret {}: {hint}", path.display())));
                }
            }
        };
        out.push(loaded);
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let value = text.trim();
    if value.is_empty() {
        return Err("file is empty".into());
    }
    Ok(Secret::new(value.as_bytes()))
}

fn fresh_value(provider: Provider, role: &str) -> Result<String, String> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| e.to_string())?;
    let whsec =
        matches!(provider, Provider::StandardWebhooks | Provider::Stripe) || role == ".signing";
    Ok(if whsec {
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    } else {
        hex::encode(raw)
    })
}

/// Writes a fresh 256-bit secret in the form the provider expects: `whsec_` +
/// base64 for the Standard Webhooks family, hex otherwise.
fn create_generated(path: &Path, provider: Provider, role: &str) -> Result<Secret, String> {
    let value = fresh_value(provider, role)?;
    let dir = path.parent().ok_or("no parent directory")?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| e.to_string())?;
    f.write_all(value.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| e.to_string())?;
    Ok(Secret::new(value.into_bytes()))
}
