//! docs/CONFIG.md cannot drift from the configuration structs: every key of
//! `ServerConfig` is documented, every documented key exists, and every
//! documented default is the one the server uses.

use std::collections::BTreeSet;

use comet::server::ServerConfig;
use serde_json::Value;

/// (`table.key`, default column) for every row of the reference's tables.
fn documented() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIG.md"))
        .expect("docs/CONFIG.md");
    doc.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // "", key, default, description, ""
            let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            key.contains('.')
                .then(|| (key.to_string(), cells.get(2).unwrap_or(&"").to_string()))
        })
        .collect()
}

/// A listener is the one thing a config must have.
const LISTENER: &str = "tcp = \"127.0.0.1:3101\"\n";

fn parse(toml: &str) -> Value {
    let config = ServerConfig::parse(toml, "test").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    serde_json::to_value(&config).unwrap()
}

/// Every key the structs have, as `table.key` (list entries by their keys).
fn struct_keys() -> BTreeSet<String> {
    let full = parse(&format!(
        "[server]\n{LISTENER}[[users]]\nmid = 1\nmkey = \"k\"\n[[groups]]\nid = 1\nmembers = [1]\n"
    ));
    let mut keys = BTreeSet::new();
    for (table, value) in full.as_object().unwrap() {
        let fields = match value {
            Value::Array(entries) => entries[0].as_object().unwrap(),
            other => other.as_object().unwrap(),
        };
        keys.extend(fields.keys().map(|k| format!("{table}.{k}")));
    }
    keys
}

#[test]
fn every_key_is_documented_and_every_documented_key_exists() {
    let doc: BTreeSet<String> = documented().into_iter().map(|(k, _)| k).collect();
    let structs = struct_keys();
    let undocumented: Vec<_> = structs.difference(&doc).collect();
    let unknown: Vec<_> = doc.difference(&structs).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/CONFIG.md is out of date: undocumented keys {undocumented:?}, documented keys that do not exist {unknown:?}"
    );
}

#[test]
fn documented_defaults_are_the_defaults() {
    let defaults = parse(&format!("[server]\n{LISTENER}"));
    let mut toml = String::new();
    for table in ["server", "store"] {
        toml.push_str(&format!("[{table}]\n"));
        if table == "server" {
            toml.push_str(LISTENER);
        }
        for (key, default) in documented() {
            let Some(field) = key.strip_prefix(&format!("{table}.")) else {
                continue;
            };
            if key == "server.tcp" {
                continue; // set above: a config needs a listener
            }
            if default == "*none*" {
                assert_eq!(
                    defaults[table][field],
                    Value::Null,
                    "{key} is documented as absent by default"
                );
                continue;
            }
            let literal = default
                .strip_prefix('`')
                .and_then(|d| d.strip_suffix('`'))
                .unwrap_or_else(|| panic!("{key}: default {default:?} is not a `TOML value`"));
            toml.push_str(&format!("{field} = {literal}\n"));
        }
    }
    // Setting every key to its documented default changes nothing.
    assert_eq!(parse(&toml), defaults, "documented defaults:\n{toml}");
}

#[test]
fn a_misspelt_key_is_refused() {
    let err = ServerConfig::parse("[server]\nmax_conections = 5\n", "test").unwrap_err();
    assert!(err.to_string().contains("max_conections"), "{err}");
}
