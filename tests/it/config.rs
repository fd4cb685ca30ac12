//! Config errors name the file, the key and what was expected; secrets named
//! but missing are errors, never silent fallbacks, and never echo a value.

use sluice::config::Config;
use sluice::ingress::source::build_sources;
use sluice::secret::Generate;

fn err(text: &str) -> String {
    match Config::parse(text, "test.toml").and_then(|c| c.validate().map(|_| c)) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn embedded_defaults_load_and_serve_the_three_documented_sources() {
    let c = Config::parse(sluice::config::EMBEDDED_DEFAULTS, "embedded").unwrap();
    c.validate().unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:3847");
    assert_eq!(c.server.data_dir, std::path::PathBuf::from("./data"));
    for (name, env) in [
        ("github", "GITHUB_WEBHOOK_SECRET"),
        ("gitlab", "GITLAB_WEBHOOK_TOKEN"),
        ("standard", "STANDARD_WEBHOOK_SECRET"),
    ] {
        let spec = &c.sources[name].secret_specs()[0];
        assert_eq!(spec.env.as_deref(), Some(env));
        assert!(spec.generate);
    }
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let e = err("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n");
    assert!(e.starts_with("test.toml: server"), "{e}");
    assert!(e.contains("lisen"), "{e}");
    let e = err("[sources.gh]\nprovider = \"github\"\nsecret = { evn = \"X\" }\n");
    assert!(e.contains("sources.gh.secret") && e.contains("evn"), "{e}");
    let e = err("[nonsense]\n");
    assert!(e.contains("nonsense"), "{e}");
}

#[test]
fn wrong_values_say_what_was_expected() {
    let e = err("[server]\nheader_timeout = \"soon\"\n");
    assert!(
        e.contains("server.header_timeout") && e.contains("duration"),
        "{e}"
    );
    let e = err("[server]\nlisten = \"nowhere\"\n");
    assert!(e.contains("server.listen"), "{e}");
    let e = err("[sources.x]\nprovider = \"gitbucket\"\nsecret = { env = \"X\" }\n");
    assert!(
        e.contains("sources.x.provider") && e.contains("github"),
        "lists the known providers: {e}"
    );
    let e = err("[sources.x]\nprovider = \"github\"\n");
    assert!(e.contains("sources.x.secret"), "{e}");
    let e =
        err("[sources.x]\nprovider = \"gitlab\"\nmode = \"signature\"\nsecret = { env = \"T\" }\n");
    assert!(e.contains("sources.x.signing_secrets"), "{e}");
    let e =
        err("[sources.x]\nprovider = \"github\"\nsecret = { env = \"X\" }\nheader = \"X-Sig\"\n");
    assert!(e.contains("sources.x.header") && e.contains("hmac"), "{e}");
    let e = err("[sources.x]\nprovider = \"hmac\"\nsecret = { env = \"X\" }\n");
    assert!(e.contains("sources.x.header"), "{e}");
    let e = err("[sources.\"a/b\"]\nprovider = \"github\"\nsecret = { env = \"X\" }\n");
    assert!(e.contains("a/b"), "{e}");
    let e = err("[server]\nlisten = \n");
    assert!(e.starts_with("test.toml: (syntax)"), "{e}");
}

#[test]
fn intake_limits_are_validated_by_key() {
    let e = err("[server]\nmax_connections_per_client = 0\n");
    assert!(e.contains("server.max_connections_per_client"), "{e}");
    let e = err("[server]\nbody_budget_bytes = 0\n");
    assert!(e.contains("server.body_budget_bytes"), "{e}");
    // A budget below a source's cap could never admit that source's largest body.
    let e = err("[server]\nbody_budget_bytes = 2000000\n\
         [sources.big]\nprovider = \"stripe\"\nsecret = { env = \"X\" }\nmax_body_bytes = 3000000\n");
    assert!(
        e.contains("server.body_budget_bytes") && e.contains("sources.big"),
        "{e}"
    );
    // Stripe, Slack and Linear default to 1 MiB, inside a 2 MB budget; GitHub does not.
    let ok = "[server]\nbody_budget_bytes = 2000000\n\
              [sources.s]\nprovider = \"slack\"\nsecret = { env = \"X\" }\n";
    let c = Config::parse(ok, "test.toml").unwrap();
    c.validate().unwrap();
    assert_eq!(c.sources["s"].max_body(&c.server), 1024 * 1024);
    let e = err("[server]\nbody_budget_bytes = 2000000\n\
                 [sources.g]\nprovider = \"github\"\nsecret = { env = \"X\" }\n");
    assert!(e.contains("sources.g"), "{e}");
}

#[test]
fn a_named_secret_that_is_missing_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n[sources.gh]\nprovider = \"github\"\nsecret = {{ env = \"SLUICE_TEST_SURELY_UNSET_VAR\" }}\n\
         [sources.f]\nprovider = \"github\"\nsecret = {{ file = \"missing.key\" }}\n",
        dir.path().display()
    );
    let mut c = Config::parse(&text, "test.toml").unwrap();
    c.base_dir = dir.path().to_path_buf();
    let e = build_sources(&c, Generate::IfMissing)
        .unwrap_err()
        .to_string();
    assert!(
        (e.contains("sources.gh.secret") && e.contains("SLUICE_TEST_SURELY_UNSET_VAR"))
            || (e.contains("sources.f.secret") && e.contains("missing.key")),
        "{e}"
    );
    assert!(
        !dir.path().join("secrets").exists(),
        "no fallback secret was generated"
    );
}

#[test]
fn generated_secrets_are_0600_reused_and_never_printed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n[sources.gh]\nprovider = \"github\"\nsecret = {{ env = \"SLUICE_TEST_UNSET_GEN\", generate = true }}\n\
         [sources.std]\nprovider = \"standard-webhooks\"\nsecret = {{ generate = true }}\n",
        dir.path().display()
    );
    let c = Config::parse(&text, "test.toml").unwrap();
    // check previews without creating anything.
    let (_, reports) = build_sources(&c, Generate::Preview).unwrap();
    assert!(
        reports
            .iter()
            .all(|r| matches!(r.origin, sluice::secret::SecretOrigin::ToGenerate(_)))
    );
    assert!(!dir.path().join("secrets").exists());
    let (sources, reports) = build_sources(&c, Generate::IfMissing).unwrap();
    let path = dir.path().join("secrets/gh.key");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let value = std::fs::read_to_string(&path).unwrap();
    assert_eq!(value.len(), 64, "256 bits as hex");
    assert!(
        std::fs::read_to_string(dir.path().join("secrets/std.key"))
            .unwrap()
            .starts_with("whsec_")
    );
    // Neither Debug of the sources nor the reports show it.
    let debug = format!("{sources:?} {reports:?}");
    assert!(!debug.contains(&value), "secret leaked into Debug output");
    // A second load reuses the same file.
    build_sources(&c, Generate::IfMissing).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), value);
}

#[test]
fn a_malformed_standard_webhooks_secret_names_the_key_not_the_value() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.key"), "whsec_***not-base64***").unwrap();
    let text = "[sources.s]\nprovider = \"standard-webhooks\"\nsecret = { file = \"s.key\" }\n";
    let mut c = Config::parse(text, "test.toml").unwrap();
    c.base_dir = dir.path().to_path_buf();
    let e = build_sources(&c, Generate::Preview)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sources.s.secret") && e.contains("whsec_"),
        "{e}"
    );
    assert!(!e.contains("not-base64"), "the value leaked: {e}");
}

#[test]
fn a_secret_pasted_into_the_config_is_not_echoed() {
    for text in [
        "[sources.gh]\nprovider = \"github\"\nsecret = \"hunter2-pasted-value\"\n",
        "[sources.gh]\nprovider = \"github\"\nsecrets = [\"hunter2-pasted-value\"]\n",
        "[sources.gh]\nprovider = \"github\"\nsecret = { env = \"hunter2-pasted-value\", generate = \"yes\" }\n",
        "[sources.gh]\nprovider = \"github\"\nsecret = hunter2-pasted-value\n",
    ] {
        let e = err(text);
        assert!(!e.contains("hunter2"), "the pasted value came back: {e}");
        assert!(e.contains("sources.gh") || e.contains("(syntax)"), "{e}");
    }
    let e = err("[sources.gh]\nprovider = \"github\"\nsecret = \"hunter2-pasted-value\"\n");
    assert!(
        e.contains("sources.gh.secret") && e.contains("never goes in the config"),
        "{e}"
    );
}

#[test]
fn rules_are_optional_unless_the_config_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let engine = sluice::rules::wasm::WasmEngine::new(None).unwrap();
    let mut c = Config::parse("", "test.toml").unwrap();
    c.base_dir = dir.path().to_path_buf();
    assert_eq!(
        c.load_rules(&engine).unwrap().rules().len(),
        0,
        "no [rules], no rules/: no rules"
    );
    let mut c = Config::parse("[rules]\ndir = \"nope\"\n", "test.toml").unwrap();
    c.base_dir = dir.path().to_path_buf();
    let e = c.load_rules(&engine).unwrap_err().to_string();
    assert!(
        e.contains("nope"),
        "a named rules directory must exist: {e}"
    );
}

#[test]
fn store_limits_are_checked_by_key() {
    for (text, key) in [
        ("[store]\nqueue_bytes = -1\n", "store.queue_bytes"),
        ("[store]\nqueue_bytes = \"lots\"\n", "store.queue_bytes"),
        (
            "[store]\nappend_timeout = \"soon\"\n",
            "store.append_timeout",
        ),
        ("[store]\nappend_timeout = 5\n", "store.append_timeout"),
        ("[store]\nretention = \"x\"\n", "store.retention"),
    ] {
        let e = err(text);
        assert!(e.starts_with("test.toml: "), "{text}: {e}");
        assert!(e.contains(key), "{text}: {e}");
    }
    // A zero timeout and a zero retention are values, not mistakes.
    let c = Config::parse(
        "[store]\nappend_timeout = \"0s\"\nretention = \"0s\"\nqueue_bytes = 0\n",
        "test.toml",
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.store.append_timeout, std::time::Duration::ZERO);
    assert_eq!(c.store.retention, std::time::Duration::ZERO);
}
