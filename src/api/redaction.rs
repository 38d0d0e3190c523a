//! The read side's PII redaction policy (issue 14): what an `auditor` (and an export) sees of an
//! event instead of its personal data. The `investigator` role sees everything.
//!
//! A policy is a TOML file (`config/redaction.toml`, format in `docs/redaction.md`) of
//! - **field rules**: a top-level field of the event as the API returns it ([`EventView`]'s JSON)
//!   or a dotted path into `metadata`, `old_value`, `new_value` or `compliance_flags`, where `*`
//!   matches any one key or array element, each with a strategy (`drop`, `mask`, `pseudonym`,
//!   `truncate_ip`);
//! - **pattern rules**: e-mail addresses or phone numbers found in the strings under chosen
//!   roots, of which only the matched text is redacted (`drop`, `mask` or `pseudonym`).
//!
//! Redaction works on the JSON handed out, never on what is stored: a redacted row keeps
//! `payload_sha256`, `immudb_key` and `immudb_tx` (rules cannot name them), so whoever holds the
//! original bytes can still prove them against immudb, and the caller adds the list [`apply`]
//! returns and the policy's [`digest`] so the reader knows what is missing and under which rules.
//!
//! Everything is prepared at construction (the rule paths compiled into one deterministic trie,
//! the e-mail regex built, the pseudonym key turned into a keyed HMAC state; phone numbers are
//! found by a hand-written scan), so [`apply`] only walks the parts of an event the policy can
//! touch, and checks each string once for `@` and digits before any pattern runs on it. It never panics on any JSON shape: arrays where
//! objects are expected, numbers where strings are expected, and nesting deeper than
//! [`MAX_DEPTH`] (which fails closed: the too-deep subtree is masked as a whole).
//!
//! [`EventView`]: super::events::EventView
//! [`apply`]: RedactionPolicy::apply
//! [`digest`]: RedactionPolicy::digest

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use hmac::{Hmac, Mac};
use regex::Regex;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What `mask` writes unless the policy sets `mask_marker`.
pub const DEFAULT_MASK_MARKER: &str = "[redacted]";
/// What a pseudonym starts with; 16 lower-case hex digits follow.
pub const PSEUDONYM_PREFIX: &str = "pseud:";
/// Shortest pseudonym key accepted, in bytes: names and e-mail addresses are few enough to be
/// guessed one by one, so the key is all that protects them.
pub const MIN_PSEUDONYM_KEY_BYTES: usize = 32;
/// Deepest nesting [`RedactionPolicy::apply`] descends into (the event object counts as 1). The
/// contract allows 127; a deeper subtree that a rule or a pattern reaches is masked whole.
pub const MAX_DEPTH: usize = 128;

/// The first line of the canonical form the digest is taken over.
const CANONICAL_HEADER: &str = "audit-consumer redaction policy v1";
/// Most segments one rule path may have.
const MAX_PATH_SEGMENTS: usize = 64;
/// Largest `keep_last`: a mask that keeps more is not a mask.
const MAX_KEEP_LAST: usize = 16;
/// Longest `mask_marker`, in characters.
const MAX_MARKER_CHARS: usize = 64;
/// Most trie nodes a policy may compile to (wildcards multiply them).
const MAX_COMPILED_NODES: usize = 100_000;
/// Hex digits of the HMAC kept in a pseudonym (64 bits).
const PSEUDONYM_HEX_DIGITS: usize = 16;

/// Fewest digits a phone number has (the prefilter skips strings with fewer).
const MIN_PHONE_DIGITS: usize = 8;
/// Most digit groups one phone number has.
const MAX_PHONE_GROUPS: usize = 8;

/// Top-level fields of an event (as the API returns it) a rule may name.
const FIELDS: &[&str] = &[
    "action",
    "category",
    "compliance_flags",
    "correlation_id",
    "entity_id",
    "event_timestamp",
    "event_version",
    "metadata",
    "module",
    "new_value",
    "old_value",
    "reason",
    "risk_level",
    "session_id",
    "signature_id",
    "source_system",
    "trace_id",
    "user_display_name",
    "user_id",
];
/// The fields above a path may go into (objects or arrays).
const NESTED_FIELDS: &[&str] = &["compliance_flags", "metadata", "new_value", "old_value"];
/// Fields that identify the row and prove it against immudb: never redacted.
const PROOF_FIELDS: &[&str] = &[
    "entity_type",
    "event_id",
    "immudb_key",
    "immudb_tx",
    "immudb_verified",
    "ingested_at",
    "payload_sha256",
    "source",
];

/// E-mail addresses: a local part, `@`, dot-separated host labels and a top-level domain of
/// letters (so `pkg@1.2.3` is not one) or an IDNA `xn--` label. No counted repetitions: over
/// Unicode classes they would multiply the automaton (label lengths do not matter here).
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)*\.(?:\p{L}{2,}|xn--[a-z0-9-]+)")
        .expect("the e-mail pattern is valid")
});

/// Why a policy cannot be used. Every message names the rule (or setting) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy file cannot be read.
    #[error("cannot read the redaction policy {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The policy file was read but is invalid.
    #[error("redaction policy {}: {error}", path.display())]
    File {
        path: PathBuf,
        error: Box<PolicyError>,
    },
    /// Not TOML, or not the policy's keys and types.
    #[error("the redaction policy is not valid: {0}")]
    Syntax(String),
    /// One rule or setting is wrong.
    #[error("{rule}: {problem}")]
    Rule { rule: String, problem: String },
    /// The policy pseudonymizes, but no key was given.
    #[error(
        "the redaction policy pseudonymizes ({rules}) but no pseudonym key was given; \
         configure one, or change those rules to another strategy"
    )]
    MissingPseudonymKey { rules: String },
    /// The pseudonym key is too short to protect guessable values.
    #[error(
        "the pseudonym key has {bytes} bytes; at least {MIN_PSEUDONYM_KEY_BYTES} are required \
         (names and e-mail addresses can be guessed one by one against a weak key)"
    )]
    WeakPseudonymKey { bytes: usize },
}

fn rule_error(rule: &str, problem: impl Into<String>) -> PolicyError {
    PolicyError::Rule {
        rule: rule.to_owned(),
        problem: problem.into(),
    }
}

/// A compiled redaction policy. Cheap to share (`Arc`), `Send + Sync`.
pub struct RedactionPolicy {
    root: Node,
    marker: String,
    /// HMAC-SHA256 keyed with the pseudonym key (present only when a rule pseudonymizes).
    mac: Option<Hmac<Sha256>>,
    field_rules: usize,
    pattern_rules: usize,
    digest: [u8; 32],
}

impl fmt::Debug for RedactionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedactionPolicy")
            .field("digest", &hex::encode(self.digest))
            .field("field_rules", &self.field_rules)
            .field("pattern_rules", &self.pattern_rules)
            .field("pseudonym_key", &self.mac.as_ref().map(|_| "[secret]"))
            .finish()
    }
}

/// What a rule does to what it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    Drop,
    /// The marker, then the value's last `keep_last` characters (0: none).
    Mask {
        keep_last: usize,
    },
    Pseudonym,
    TruncateIp,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Mask { .. } => "mask",
            Self::Pseudonym => "pseudonym",
            Self::TruncateIp => "truncate_ip",
        }
    }

    /// Which of two strategies for the same value wins: the one that reveals less.
    fn strength(self) -> (u8, Reverse<usize>) {
        match self {
            Self::Drop => (3, Reverse(0)),
            Self::Mask { keep_last } => (2, Reverse(keep_last)),
            Self::TruncateIp => (1, Reverse(0)),
            Self::Pseudonym => (0, Reverse(0)),
        }
    }

    fn strongest(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.strength() > a.strength() { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// What the pattern rules reaching a value look for, and what they do with a match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Scan {
    email: Option<Strategy>,
    phone: Option<Strategy>,
}

impl Scan {
    fn is_empty(self) -> bool {
        self.email.is_none() && self.phone.is_none()
    }

    fn union(self, other: Self) -> Self {
        Self {
            email: Strategy::strongest(self.email, other.email),
            phone: Strategy::strongest(self.phone, other.phone),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatternKind {
    Email,
    Phone,
}

impl PatternKind {
    fn name(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Phone => "phone",
        }
    }
}

/// The rule paths as written: one node per path prefix, `*` kept apart.
#[derive(Default)]
struct RawNode {
    exact: BTreeMap<String, RawNode>,
    any: Option<Box<RawNode>>,
    action: Option<Strategy>,
    scan: Scan,
}

impl RawNode {
    fn at(&mut self, segments: &[&str]) -> &mut RawNode {
        let mut node = self;
        for segment in segments {
            node = if *segment == "*" {
                node.any.get_or_insert_with(Box::default)
            } else {
                node.exact.entry((*segment).to_owned()).or_default()
            };
        }
        node
    }
}

/// The compiled trie: every position in an event matches at most one node, because each exact
/// child already includes what the `*` sibling would do there.
#[derive(Default)]
struct Node {
    /// Sorted by key.
    exact: Vec<Edge>,
    /// Keys and indices not in `exact`.
    any: Option<Box<Node>>,
    /// The field rule for this position; nothing below it matters.
    action: Option<Strategy>,
    /// Pattern rules rooted here (they also hold below).
    scan: Scan,
}

struct Edge {
    key: Box<str>,
    /// The key as an array index, when it is a canonical decimal number.
    index: Option<usize>,
    node: Node,
}

impl Node {
    fn child_key(&self, key: &str) -> Option<&Node> {
        match self.exact.binary_search_by(|e| (*e.key).cmp(key)) {
            Ok(i) => Some(&self.exact[i].node),
            Err(_) => self.any.as_deref(),
        }
    }

    fn child_index(&self, index: usize) -> Option<&Node> {
        self.exact
            .iter()
            .find(|e| e.index == Some(index))
            .map(|e| &e.node)
            .or(self.any.as_deref())
    }

    /// Merges the raw nodes that match one position into one compiled node.
    fn compile(sources: &[&RawNode], budget: &mut usize) -> Result<Node, PolicyError> {
        *budget = budget.checked_sub(1).ok_or_else(|| {
            rule_error(
                "policy",
                format!(
                    "its paths compile to more than {MAX_COMPILED_NODES} nodes; use fewer `*` \
                     segments"
                ),
            )
        })?;
        let mut node = Node::default();
        for source in sources {
            node.action = Strategy::strongest(node.action, source.action);
            node.scan = node.scan.union(source.scan);
        }
        if node.action.is_some() {
            // The whole value is replaced: nothing below it can apply.
            return Ok(node);
        }
        let anys: Vec<&RawNode> = sources.iter().filter_map(|s| s.any.as_deref()).collect();
        let keys: BTreeSet<&str> = sources
            .iter()
            .flat_map(|s| s.exact.keys().map(String::as_str))
            .collect();
        for key in keys {
            let mut set: Vec<&RawNode> = sources.iter().filter_map(|s| s.exact.get(key)).collect();
            set.extend(anys.iter().copied());
            node.exact.push(Edge {
                key: key.into(),
                index: key.parse::<usize>().ok().filter(|i| i.to_string() == key),
                node: Node::compile(&set, budget)?,
            });
        }
        if !anys.is_empty() {
            node.any = Some(Box::new(Node::compile(&anys, budget)?));
        }
        Ok(node)
    }
}

/// The policy file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: Option<i64>,
    mask_marker: Option<String>,
    #[serde(default)]
    field: Vec<FieldRuleFile>,
    #[serde(default)]
    pattern: Vec<PatternRuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldRuleFile {
    path: Option<String>,
    strategy: Option<String>,
    keep_last: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatternRuleFile {
    kind: Option<String>,
    strategy: Option<String>,
    roots: Option<Vec<String>>,
    keep_last: Option<i64>,
}

fn parse_strategy(
    rule: &str,
    name: Option<&str>,
    keep_last: Option<i64>,
) -> Result<Strategy, PolicyError> {
    let name = name.ok_or_else(|| {
        rule_error(
            rule,
            "`strategy` is missing (drop, mask, pseudonym or truncate_ip)",
        )
    })?;
    let strategy = match name {
        "drop" => Strategy::Drop,
        "mask" => Strategy::Mask { keep_last: 0 },
        "pseudonym" => Strategy::Pseudonym,
        "truncate_ip" => Strategy::TruncateIp,
        other => {
            return Err(rule_error(
                rule,
                format!(
                    "unknown strategy \"{other}\"; the strategies are drop, mask, pseudonym and \
                     truncate_ip"
                ),
            ));
        }
    };
    match (strategy, keep_last) {
        (_, None) => Ok(strategy),
        (Strategy::Mask { .. }, Some(n)) => match usize::try_from(n) {
            Ok(n) if n <= MAX_KEEP_LAST => Ok(Strategy::Mask { keep_last: n }),
            _ => Err(rule_error(
                rule,
                format!("keep_last = {n} is outside 0..={MAX_KEEP_LAST}"),
            )),
        },
        (other, Some(_)) => Err(rule_error(
            rule,
            format!(
                "keep_last only applies to the mask strategy, not to {}",
                other.name()
            ),
        )),
    }
}

/// Checks a rule path and splits it into segments; the error is the problem, in words.
fn parse_path(path: &str) -> Result<Vec<&str>, String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.trim() != path {
        return Err("the path has leading or trailing whitespace".into());
    }
    let segments: Vec<&str> = path.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err("the path has an empty segment (two dots, or a dot at an end)".into());
    }
    if segments.len() > MAX_PATH_SEGMENTS {
        return Err(format!(
            "the path has {} segments; at most {MAX_PATH_SEGMENTS} are allowed",
            segments.len()
        ));
    }
    if let Some(bad) = segments.iter().find(|s| s.contains('*') && **s != "*") {
        return Err(format!(
            "segment \"{bad}\": `*` must be a whole segment (it matches exactly one key or array \
             element)"
        ));
    }
    let first = segments[0];
    if first == "*" {
        return Err(
            "the path cannot start with `*`: the top level holds the fields that identify and \
             prove the row"
                .into(),
        );
    }
    if PROOF_FIELDS.contains(&first) {
        return Err(format!(
            "`{first}` identifies or proves the row against immudb and is never redacted"
        ));
    }
    if !FIELDS.contains(&first) {
        return Err(format!(
            "unknown field \"{first}\"; a path starts with one of: {}",
            FIELDS.join(", ")
        ));
    }
    if segments.len() > 1 && !NESTED_FIELDS.contains(&first) {
        return Err(format!(
            "`{first}` holds a single value; only {} can be gone into",
            NESTED_FIELDS.join(", ")
        ));
    }
    Ok(segments)
}

/// A TOML error as one line: where, then what.
fn syntax_error(text: &str, error: &toml::de::Error) -> PolicyError {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            PolicyError::Syntax(format!("line {line}, column {column}: {message}"))
        }
        None => PolicyError::Syntax(message),
    }
}

fn keep_last_json(strategy: Strategy) -> Value {
    match strategy {
        Strategy::Mask { keep_last } => Value::from(keep_last),
        _ => Value::Null,
    }
}

impl RedactionPolicy {
    /// Reads and compiles the policy file at `path` (see [`RedactionPolicy::from_toml`]).
    pub fn load(path: &Path, pseudonym_key: Option<SecretString>) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_toml(&text, pseudonym_key).map_err(|error| PolicyError::File {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    /// Compiles a policy from its TOML text. `pseudonym_key` is the secret the `pseudonym`
    /// strategy keys its HMAC with (its UTF-8 bytes, at least [`MIN_PSEUDONYM_KEY_BYTES`]);
    /// it is required when a rule pseudonymizes and ignored otherwise.
    pub fn from_toml(text: &str, pseudonym_key: Option<SecretString>) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        if let Some(version) = file.version
            && version != 1
        {
            return Err(rule_error(
                "version",
                format!("version {version} is not supported; this build reads version 1"),
            ));
        }
        let marker = file
            .mask_marker
            .unwrap_or_else(|| DEFAULT_MASK_MARKER.to_owned());
        if marker.is_empty()
            || marker.chars().count() > MAX_MARKER_CHARS
            || marker.chars().any(char::is_control)
        {
            return Err(rule_error(
                "mask_marker",
                format!("must be 1 to {MAX_MARKER_CHARS} characters without control characters"),
            ));
        }

        let mut raw = RawNode::default();
        let mut lines = vec![serde_json::json!(["mask_marker", marker]).to_string()];
        let mut pseudonymizing = Vec::new();

        let mut seen_paths: HashMap<&str, usize> = HashMap::new();
        for (i, rule) in file.field.iter().enumerate() {
            let number = i + 1;
            let Some(path) = rule.path.as_deref() else {
                return Err(rule_error(
                    &format!("field rule {number}"),
                    "`path` is missing",
                ));
            };
            let label = format!("field rule {number} (path \"{path}\")");
            let segments = parse_path(path).map_err(|problem| rule_error(&label, problem))?;
            let strategy = parse_strategy(&label, rule.strategy.as_deref(), rule.keep_last)?;
            if let Some(earlier) = seen_paths.insert(path, number) {
                return Err(rule_error(
                    &label,
                    format!("the path is already given by field rule {earlier}"),
                ));
            }
            raw.at(&segments).action = Some(strategy);
            if strategy == Strategy::Pseudonym {
                pseudonymizing.push(format!("field {path}"));
            }
            lines.push(
                serde_json::json!(["field", path, strategy.name(), keep_last_json(strategy)])
                    .to_string(),
            );
        }

        let mut seen_roots: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, rule) in file.pattern.iter().enumerate() {
            let number = i + 1;
            let kind = match rule.kind.as_deref() {
                Some("email") => PatternKind::Email,
                Some("phone") => PatternKind::Phone,
                Some(other) => {
                    return Err(rule_error(
                        &format!("pattern rule {number}"),
                        format!("unknown kind \"{other}\"; the kinds are email and phone"),
                    ));
                }
                None => {
                    return Err(rule_error(
                        &format!("pattern rule {number}"),
                        "`kind` is missing (email or phone)",
                    ));
                }
            };
            let label = format!("pattern rule {number} ({})", kind.name());
            let strategy = parse_strategy(&label, rule.strategy.as_deref(), rule.keep_last)?;
            if strategy == Strategy::TruncateIp {
                return Err(rule_error(
                    &label,
                    "truncate_ip applies to IP address fields, not to matched text; use drop, \
                     mask or pseudonym",
                ));
            }
            let roots = match rule.roots.as_deref() {
                Some(roots) if !roots.is_empty() => roots,
                _ => {
                    return Err(rule_error(
                        &label,
                        "`roots` is missing or empty: name the fields to scan, e.g. [\"reason\"]",
                    ));
                }
            };
            for root in roots {
                let segments = parse_path(root)
                    .map_err(|problem| rule_error(&label, format!("root \"{root}\": {problem}")))?;
                if let Some(earlier) = seen_roots.insert((kind.name(), root), number) {
                    return Err(rule_error(
                        &label,
                        format!(
                            "root \"{root}\" is already scanned for {} by pattern rule {earlier}",
                            kind.name()
                        ),
                    ));
                }
                let add = match kind {
                    PatternKind::Email => Scan {
                        email: Some(strategy),
                        phone: None,
                    },
                    PatternKind::Phone => Scan {
                        email: None,
                        phone: Some(strategy),
                    },
                };
                let node = raw.at(&segments);
                node.scan = node.scan.union(add);
                lines.push(
                    serde_json::json!([
                        "pattern",
                        kind.name(),
                        root,
                        strategy.name(),
                        keep_last_json(strategy)
                    ])
                    .to_string(),
                );
            }
            if strategy == Strategy::Pseudonym {
                pseudonymizing.push(format!("{} in {}", kind.name(), roots.join(", ")));
            }
        }

        let mac = if pseudonymizing.is_empty() {
            None
        } else {
            let Some(key) = pseudonym_key else {
                return Err(PolicyError::MissingPseudonymKey {
                    rules: pseudonymizing.join("; "),
                });
            };
            let bytes = key.expose_secret().as_bytes();
            if bytes.len() < MIN_PSEUDONYM_KEY_BYTES {
                return Err(PolicyError::WeakPseudonymKey { bytes: bytes.len() });
            }
            Some(
                Hmac::<Sha256>::new_from_slice(bytes)
                    .map_err(|_| PolicyError::WeakPseudonymKey { bytes: bytes.len() })?,
            )
        };

        // Built once per process; here rather than on the first row.
        LazyLock::force(&EMAIL);
        let mut budget = MAX_COMPILED_NODES;
        let root = Node::compile(&[&raw], &mut budget)?;

        lines.sort();
        let mut canonical = String::from(CANONICAL_HEADER);
        canonical.push('\n');
        for line in &lines {
            canonical.push_str(line);
            canonical.push('\n');
        }
        Ok(Self {
            root,
            marker,
            mac,
            field_rules: file.field.len(),
            pattern_rules: file.pattern.len(),
            digest: Sha256::digest(canonical.as_bytes()).into(),
        })
    }

    /// SHA-256 of the policy's canonical form (its rules, not its key; the same rules in any
    /// order or formatting give the same digest). Format in `docs/redaction.md`.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Whether the policy has no rules (applying it changes nothing).
    pub fn is_empty(&self) -> bool {
        self.field_rules == 0 && self.pattern_rules == 0
    }

    /// Redacts `event` (an event in the API's JSON shape, `EventView`) in place and returns the
    /// concrete paths it redacted, sorted and without repeats (`metadata.ip_address`,
    /// `new_value.contacts.0.email`, `reason` for a pattern match inside `reason`). Array
    /// positions in paths are those of the stored value. Null values are left as they are.
    pub fn apply(&self, event: &mut Value) -> Vec<String> {
        if self.is_empty() || !event.is_object() {
            return Vec::new();
        }
        let mut walk = Walk {
            policy: self,
            path: String::new(),
            out: Vec::new(),
        };
        walk.container(event, Some(&self.root), Scan::default(), 1);
        let mut out = walk.out;
        out.sort_unstable();
        out.dedup();
        out
    }

    /// What a field rule puts in place of a (non-null) value.
    fn render_field(&self, value: &Value, strategy: Strategy, depth: usize) -> String {
        match (strategy, value) {
            (Strategy::Mask { keep_last }, Value::String(s)) => {
                let mut out = String::new();
                self.mask_into(s, keep_last, &mut out);
                out
            }
            (Strategy::Pseudonym, Value::String(s)) => {
                let mut out = String::new();
                self.pseudonym_into(s.as_bytes(), &mut out);
                out
            }
            (Strategy::Pseudonym, other) => {
                let mut bytes = Vec::new();
                if canonical_json(other, &mut bytes, MAX_DEPTH.saturating_sub(depth)) {
                    let mut out = String::new();
                    self.pseudonym_into(&bytes, &mut out);
                    out
                } else {
                    self.marker.clone()
                }
            }
            (Strategy::TruncateIp, Value::String(s)) => {
                truncate_ip(s).unwrap_or_else(|| self.marker.clone())
            }
            _ => self.marker.clone(),
        }
    }

    /// The marker, then the last `keep_last` characters if at least as many stay hidden.
    fn mask_into(&self, text: &str, keep_last: usize, out: &mut String) {
        out.push_str(&self.marker);
        if keep_last == 0 {
            return;
        }
        let chars = text.chars().count();
        if chars >= 2 * keep_last
            && let Some((start, _)) = text.char_indices().nth(chars - keep_last)
        {
            out.push_str(&text[start..]);
        }
    }

    /// `pseud:` and the first 16 hex digits of HMAC-SHA256(key, bytes).
    fn pseudonym_into(&self, bytes: &[u8], out: &mut String) {
        let Some(mac) = &self.mac else {
            // Construction refuses a pseudonymizing policy without a key; fail closed anyway.
            out.push_str(&self.marker);
            return;
        };
        let mut mac = mac.clone();
        mac.update(bytes);
        let tag = mac.finalize().into_bytes();
        out.push_str(PSEUDONYM_PREFIX);
        out.push_str(&hex::encode(&tag[..PSEUDONYM_HEX_DIGITS / 2]));
    }

    /// The text with every pattern match replaced, or `None` when nothing matched.
    fn scan_text(&self, text: &str, scan: Scan) -> Option<String> {
        // One cheap pass decides which regexes can match at all.
        let bytes = text.as_bytes();
        let has_at = bytes.contains(&b'@');
        let digits = bytes.iter().filter(|b| b.is_ascii_digit()).count();
        let mut hits: Vec<(usize, usize, Strategy)> = Vec::new();
        if let Some(strategy) = scan.email
            && has_at
        {
            hits.extend(
                EMAIL
                    .find_iter(text)
                    .map(|m| (m.start(), m.end(), strategy)),
            );
        }
        if let Some(strategy) = scan.phone
            && digits >= MIN_PHONE_DIGITS
        {
            let mut groups = Vec::new();
            phone_candidates(text, |range| {
                phone_numbers(text, range, &mut groups, |start, end| {
                    hits.push((start, end, strategy));
                });
            });
        }
        if hits.is_empty() {
            return None;
        }
        // Earliest first; overlapping matches are merged into one, redacted by the stronger
        // strategy, so no part of either is left visible.
        hits.sort_unstable_by_key(|&(start, end, _)| (start, Reverse(end)));
        let mut merged: Vec<(usize, usize, Strategy)> = Vec::with_capacity(hits.len());
        for (start, end, strategy) in hits {
            match merged.last_mut() {
                Some(last) if start < last.1 => {
                    last.1 = last.1.max(end);
                    last.2 = Strategy::strongest(Some(last.2), Some(strategy)).unwrap_or(strategy);
                }
                _ => merged.push((start, end, strategy)),
            }
        }
        let mut out = String::with_capacity(text.len());
        let mut done = 0;
        for (start, end, strategy) in merged {
            out.push_str(&text[done..start]);
            let matched = &text[start..end];
            match strategy {
                Strategy::Drop => {}
                Strategy::Mask { keep_last } => self.mask_into(matched, keep_last, &mut out),
                Strategy::Pseudonym => self.pseudonym_into(matched.as_bytes(), &mut out),
                Strategy::TruncateIp => out.push_str(&self.marker),
            }
            done = end;
        }
        out.push_str(&text[done..]);
        Some(out)
    }
}

/// One walk over one event.
struct Walk<'p> {
    policy: &'p RedactionPolicy,
    /// The concrete path of the value being visited.
    path: String,
    out: Vec<String>,
}

/// Whether a value can hold anything a pattern finds.
fn scannable(value: &Value) -> bool {
    match value {
        Value::String(_) => true,
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
        _ => false,
    }
}

impl Walk<'_> {
    fn enter(&mut self, segment: impl fmt::Display) -> usize {
        use std::fmt::Write as _;
        let mark = self.path.len();
        if mark > 0 {
            self.path.push('.');
        }
        let _ = write!(self.path, "{segment}");
        mark
    }

    fn report(&mut self) {
        self.out.push(self.path.clone());
    }

    /// Visits the children of an object or array at `depth` that `node` or `scan` reach.
    fn container(&mut self, value: &mut Value, node: Option<&Node>, scan: Scan, depth: usize) {
        let narrow = node.filter(|n| scan.is_empty() && n.any.is_none());
        match value {
            Value::Object(map) => match narrow {
                // Only the named keys can be affected: look them up.
                Some(node) => {
                    for edge in &node.exact {
                        let Some(child) = map.get_mut(&*edge.key) else {
                            continue;
                        };
                        let mark = self.enter(&edge.key);
                        let remove = self.child(child, Some(&edge.node), scan, depth + 1);
                        self.path.truncate(mark);
                        if remove {
                            map.remove(&*edge.key);
                        }
                    }
                }
                None => map.retain(|key, child| {
                    let child_node = node.and_then(|n| n.child_key(key));
                    if child_node.is_none() && (scan.is_empty() || !scannable(child)) {
                        return true;
                    }
                    let mark = self.enter(key);
                    let remove = self.child(child, child_node, scan, depth + 1);
                    self.path.truncate(mark);
                    !remove
                }),
            },
            Value::Array(items) => {
                let visit = |walk: &mut Self, index: usize, child: &mut Value, n| {
                    let mark = walk.enter(index);
                    if walk.child(child, n, scan, depth + 1) {
                        // Dropping an element keeps the array's length, so the positions in
                        // the redacted row are those of the stored value.
                        *child = Value::Null;
                    }
                    walk.path.truncate(mark);
                };
                match narrow {
                    Some(node) => {
                        for edge in &node.exact {
                            if let Some(index) = edge.index
                                && let Some(child) = items.get_mut(index)
                            {
                                visit(self, index, child, Some(&edge.node));
                            }
                        }
                    }
                    None => {
                        for (index, child) in items.iter_mut().enumerate() {
                            let child_node = node.and_then(|n| n.child_index(index));
                            if child_node.is_none() && (scan.is_empty() || !scannable(child)) {
                                continue;
                            }
                            visit(self, index, child, child_node);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Applies what reaches one value (at `depth`; `self.path` names it). Returns whether the
    /// value is to be dropped.
    fn child(&mut self, value: &mut Value, node: Option<&Node>, scan: Scan, depth: usize) -> bool {
        let scan = node.map_or(scan, |n| scan.union(n.scan));
        if let Some(strategy) = node.and_then(|n| n.action) {
            if value.is_null() {
                return false;
            }
            self.report();
            if strategy == Strategy::Drop {
                return true;
            }
            *value = Value::String(self.policy.render_field(value, strategy, depth));
            return false;
        }
        match value {
            Value::String(text) => {
                if !scan.is_empty()
                    && let Some(redacted) = self.policy.scan_text(text, scan)
                {
                    *text = redacted;
                    self.report();
                }
            }
            Value::Object(_) | Value::Array(_) => {
                if node.is_none() && scan.is_empty() {
                    return false;
                }
                if depth > MAX_DEPTH {
                    // Too deep to look into: whatever it holds is not shown.
                    if scannable(value) {
                        *value = Value::String(self.policy.marker.clone());
                        self.report();
                    }
                } else {
                    self.container(value, node, scan, depth);
                }
            }
            _ => {}
        }
        false
    }
}

/// `value` as canonical JSON (object keys sorted, no whitespace, serde_json's escaping and
/// numbers); `false` when it nests deeper than `depth_left`.
fn canonical_json(value: &Value, out: &mut Vec<u8>, depth_left: usize) -> bool {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => {
            if serde_json::to_writer(&mut *out, s).is_err() {
                return false;
            }
        }
        Value::Array(items) => {
            if depth_left == 0 {
                return false;
            }
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if !canonical_json(item, out, depth_left - 1) {
                    return false;
                }
            }
            out.push(b']');
        }
        Value::Object(map) => {
            if depth_left == 0 {
                return false;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by_key(|(k, _)| k.as_str());
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if serde_json::to_writer(&mut *out, key).is_err() {
                    return false;
                }
                out.push(b':');
                if !canonical_json(item, out, depth_left - 1) {
                    return false;
                }
            }
            out.push(b'}');
        }
    }
    true
}

/// An address's network: IPv4 to its /24, IPv6 to its /48 (an IPv4-mapped IPv6 address as
/// IPv4). Accepts `addr`, `addr:port` and `[v6]:port`, with surrounding whitespace. `None` when
/// the text is no IP address.
fn truncate_ip(text: &str) -> Option<String> {
    let text = text.trim();
    let ip = text
        .parse::<IpAddr>()
        .or_else(|_| text.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()?;
    let v4 = |ip: Ipv4Addr| {
        let [a, b, c, _] = ip.octets();
        format!("{a}.{b}.{c}.0/24")
    };
    Some(match ip {
        IpAddr::V4(ip) => v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(mapped) => v4(mapped),
            None => {
                let s = ip.segments();
                format!("{}/48", Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0))
            }
        },
    })
}

/// Finds phone number candidates, leftmost first, each as long as it goes: digits and
/// parenthesised groups of 1 to 5 digits, with at most one space, dash or dot between them, and
/// an optional leading `+` (what `\+?(?:\([0-9]{1,5}\)|[0-9])(?:[ .-]?(?:\([0-9]{1,5}\)|[0-9]))*`
/// would find; by hand, since this runs on every string with enough digits). Which candidates
/// are phone numbers is decided by [`phone_numbers`].
fn phone_candidates(text: &str, mut found: impl FnMut((usize, usize))) {
    let bytes = text.as_bytes();
    // The end of a digit or a parenthesised group starting at `at`.
    let atom = |at: usize| -> Option<usize> {
        match bytes.get(at)? {
            b'0'..=b'9' => Some(at + 1),
            b'(' => {
                let digits = bytes[at + 1..]
                    .iter()
                    .take(6)
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                ((1..=5).contains(&digits) && bytes.get(at + 1 + digits) == Some(&b')'))
                    .then_some(at + digits + 2)
            }
            _ => None,
        }
    };
    let mut i = 0;
    while i < bytes.len() {
        let first = if bytes[i] == b'+' { i + 1 } else { i };
        let Some(mut end) = atom(first) else {
            i += 1;
            continue;
        };
        loop {
            let next = match bytes.get(end) {
                Some(b' ' | b'.' | b'-') => end + 1,
                _ => end,
            };
            match atom(next) {
                Some(after) => end = after,
                None => break,
            }
        }
        found((i, end));
        i = end;
    }
}

/// One run of digits inside a phone candidate, with what separates it from the previous one.
#[derive(Debug, Clone, Copy)]
struct Group {
    /// Byte range of the digits in the text.
    start: usize,
    end: usize,
    /// Whether the digits are in parentheses.
    paren: bool,
    /// Byte range of the text between the previous group (its parenthesis included) and this
    /// one, e.g. " ", "-", ") ", " ("; empty for the first group.
    sep_start: usize,
    sep_end: usize,
}

impl Group {
    /// Where the group starts and ends in the text, its parentheses included.
    fn span(&self) -> (usize, usize) {
        if self.paren {
            (self.start - 1, self.end + 1)
        } else {
            (self.start, self.end)
        }
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn sep<'t>(&self, text: &'t str) -> &'t str {
        &text[self.sep_start..self.sep_end]
    }
}

/// Reports every phone number inside the candidate `text[start..end]`: the candidate itself if it
/// has a phone number's shape, else its longest space-separated parts that do. `groups` is
/// scratch space.
fn phone_numbers(
    text: &str,
    (start, end): (usize, usize),
    groups: &mut Vec<Group>,
    mut found: impl FnMut(usize, usize),
) {
    let bytes = text.as_bytes();
    if bytes[start..end]
        .iter()
        .filter(|b| b.is_ascii_digit())
        .count()
        < MIN_PHONE_DIGITS
    {
        return;
    }
    let plus = bytes[start] == b'+';
    groups.clear();
    let mut i = start;
    let mut previous_end = start;
    while i < end {
        if bytes[i].is_ascii_digit() {
            let from = i;
            while i < end && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let paren = from > start && bytes[from - 1] == b'(';
            let sep_end = if paren { from - 1 } else { from };
            let sep_start = if groups.is_empty() {
                sep_end
            } else {
                previous_end.min(sep_end)
            };
            let group = Group {
                start: from,
                end: i,
                paren,
                sep_start,
                sep_end,
            };
            previous_end = group.span().1;
            groups.push(group);
        } else {
            i += 1;
        }
    }

    let mut a = 0;
    'starts: while a < groups.len() {
        // A part may start at the candidate's start or after a plain space.
        if a > 0 && groups[a].sep(text) != " " {
            a += 1;
            continue;
        }
        let with_plus = plus && a == 0;
        let from = if with_plus { start } else { groups[a].span().0 };
        if !boundary_before(text, from, with_plus) {
            a += 1;
            continue;
        }
        let last = (a + MAX_PHONE_GROUPS).min(groups.len()) - 1;
        for b in (a..=last).rev() {
            // A part may end at the candidate's end or before a plain space.
            if b + 1 < groups.len() && groups[b + 1].sep(text) != " " {
                continue;
            }
            let to = groups[b].span().1;
            if b + 1 == groups.len() && !boundary_after(text, to) {
                continue;
            }
            if phone_shape(text, &groups[a..=b], with_plus) {
                found(from, to);
                a = b + 1;
                continue 'starts;
            }
        }
        a += 1;
    }
}

/// Whether a phone number may start at byte `at`: not glued to a word, an id, a number or a
/// time before it.
fn boundary_before(text: &str, at: usize, plus: bool) -> bool {
    match text[..at].chars().next_back() {
        None => true,
        Some(c) => {
            !(c.is_alphanumeric()
                || matches!(c, '_' | '-' | '.' | '/' | '@' | '#' | '&' | '=' | '+' | '%')
                || (c == ':' && !plus))
        }
    }
}

/// Whether a phone number may end at byte `at`: not glued to a word, nor continued as a time, a
/// date, a list of numbers or a path.
fn boundary_after(text: &str, at: usize) -> bool {
    let mut rest = text[at..].chars();
    match rest.next() {
        None => true,
        Some(c) if c.is_alphanumeric() || matches!(c, '_' | '@' | '%') => false,
        Some(':' | '/' | ',' | '.' | '-') => !rest.next().is_some_and(|c| c.is_ascii_digit()),
        Some(_) => true,
    }
}

/// Whether digit groups look like a phone number rather than an id, a date, a time, a decimal
/// number or an address:
/// - international: `+` and 8 to 15 digits (`+41 79 123 45 67`, `+1 (555) 123-4567`,
///   `+41791234567`); or `00`, a country code and 10 to 15 digits in two groups or more;
/// - a parenthesised area code (`(555) 123-4567`, `(020) 7946 0958`), 9 to 15 digits;
/// - North American `555-123-4567` / `1-555-123-4567` (one kind of separator);
/// - national with a trunk zero, one kind of separator: `079 123 45 67`, `020-7946-0958`,
///   `030 1234567`, `06.12.34.56.78` (dots only with four groups or more), 9 to 12 digits.
///
/// A single dot between groups is a decimal point, never a phone number.
fn phone_shape(text: &str, groups: &[Group], plus: bool) -> bool {
    let digits: usize = groups.iter().map(Group::len).sum();
    let rest = &groups[1..];
    if rest.iter().filter(|g| g.sep(text).contains('.')).count() == 1 {
        return false;
    }
    if plus {
        return (8..=15).contains(&digits);
    }
    let first = &text[groups[0].start..groups[0].end];
    if first.starts_with("00") {
        return first.len() > 2
            && first.as_bytes()[2] != b'0'
            && !rest.is_empty()
            && (11..=17).contains(&digits);
    }
    if groups[0].paren {
        return (first.starts_with('0') || first.len() == 3)
            && !rest.is_empty()
            && rest.iter().all(|g| !g.paren)
            && (9..=15).contains(&digits);
    }
    let Some(second) = rest.first() else {
        return false;
    };
    let one = second.sep(text);
    if !matches!(one, " " | "-" | ".") || rest.iter().any(|g| g.paren || g.sep(text) != one) {
        return false;
    }
    let lens_are = |lens: &[usize]| {
        groups.len() == lens.len() && groups.iter().zip(lens).all(|(g, l)| g.len() == *l)
    };
    let starts_2_to_9 = |g: &Group| matches!(text.as_bytes()[g.start], b'2'..=b'9');
    if lens_are(&[3, 3, 4]) && starts_2_to_9(&groups[0]) {
        return true;
    }
    if lens_are(&[1, 3, 3, 4]) && first == "1" && starts_2_to_9(second) {
        return true;
    }
    let trunk = first.len() >= 2 && first.starts_with('0') && first.as_bytes()[1] != b'0';
    if !trunk || !(9..=12).contains(&digits) || !(2..=5).contains(&first.len()) {
        return false;
    }
    if one == "." && groups.len() < 4 {
        return false;
    }
    match rest {
        [only] => (5..=8).contains(&only.len()),
        _ => rest.iter().all(|g| (2..=4).contains(&g.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "0123456789abcdef0123456789abcdef-test-key";

    fn key() -> Option<SecretString> {
        Some(KEY.to_owned().into())
    }

    fn policy(text: &str) -> RedactionPolicy {
        RedactionPolicy::from_toml(text, key()).expect("valid policy")
    }

    fn error(text: &str) -> String {
        RedactionPolicy::from_toml(text, key())
            .expect_err("invalid policy")
            .to_string()
    }

    fn default_policy() -> RedactionPolicy {
        policy(include_str!("../../config/redaction.toml"))
    }

    /// HMAC-SHA256 computed independently of the module, as an auditor holding the key would.
    fn expected_pseudonym(input: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).expect("any key length");
        mac.update(input.as_bytes());
        format!("pseud:{}", &hex::encode(mac.finalize().into_bytes())[..16])
    }

    /// Redacts `s` as the value of `reason` with email and phone masking.
    fn scrub(s: &str) -> String {
        let p = policy(
            r#"
            [[pattern]]
            kind = "email"
            strategy = "mask"
            roots = ["reason"]
            [[pattern]]
            kind = "phone"
            strategy = "mask"
            roots = ["reason"]
            "#,
        );
        let mut event = json!({ "reason": s });
        p.apply(&mut event);
        event["reason"].as_str().expect("still a string").to_owned()
    }

    fn event() -> Value {
        json!({
            "event_id": "0b7e6f2a-52a4-4a8e-9a51-4f6f4c1d2e3f",
            "event_timestamp": "2026-03-01T10:15:00.000000Z",
            "entity_type": "batch",
            "entity_id": "B-2026-0042",
            "action": "BATCH_RELEASED",
            "user_id": "u-1842",
            "user_display_name": "Jane Roe",
            "trace_id": null,
            "session_id": "sess-77f1",
            "correlation_id": null,
            "old_value": { "status": "QUARANTINE", "qp": { "name": "Jane Roe", "email": "jane.roe@plant.example" } },
            "new_value": {
                "status": "RELEASED",
                "contacts": [
                    { "name": "A", "email": "a@x.example", "phone": "+41 79 123 45 67" },
                    { "name": "B", "email": "b@x.example" }
                ],
                "note": "Released after review; questions to qa@plant.example or +44 20 7946 0958."
            },
            "reason": "CoA received from supplier, call +1 (555) 123-4567",
            "signature_id": "sig-1",
            "metadata": { "source": "mes", "ip_address": "10.1.2.3", "user_agent": "Mozilla/5.0 (X11)" },
            "module": "release",
            "risk_level": "HIGH",
            "compliance_flags": ["GMP"],
            "source_system": "mes",
            "event_version": "1",
            "category": "BATCH_LIFECYCLE",
            "immudb_key": "audit:batch:0b7e6f2a-52a4-4a8e-9a51-4f6f4c1d2e3f",
            "immudb_tx": 42,
            "immudb_verified": true,
            "payload_sha256": "ab".repeat(32),
            "source": { "topic": "audit.plant-lifecycle.v1", "partition": 0, "offset": 7 },
            "ingested_at": "2026-03-01T10:15:01.000000Z"
        })
    }

    #[test]
    fn drop_removes_the_key_and_names_it() {
        let p = policy("[[field]]\npath = \"session_id\"\nstrategy = \"drop\"\n");
        let mut e = event();
        assert_eq!(p.apply(&mut e), ["session_id"]);
        assert!(e.get("session_id").is_none());
        assert_eq!(e["user_id"], "u-1842");
    }

    #[test]
    fn mask_writes_the_marker_or_keeps_the_last_characters() {
        let p = policy(
            r#"
            [[field]]
            path = "metadata.user_agent"
            strategy = "mask"
            [[field]]
            path = "user_id"
            strategy = "mask"
            keep_last = 2
            [[field]]
            path = "signature_id"
            strategy = "mask"
            keep_last = 4
            [[field]]
            path = "old_value.qp"
            strategy = "mask"
            "#,
        );
        let mut e = event();
        let redacted = p.apply(&mut e);
        assert_eq!(
            redacted,
            [
                "metadata.user_agent",
                "old_value.qp",
                "signature_id",
                "user_id"
            ]
        );
        assert_eq!(e["metadata"]["user_agent"], "[redacted]");
        assert_eq!(e["user_id"], "[redacted]42");
        // "sig-1" has 5 characters: keeping 4 would hide only one, so none are kept.
        assert_eq!(e["signature_id"], "[redacted]");
        // A non-string value is masked whole.
        assert_eq!(e["old_value"]["qp"], "[redacted]");
    }

    #[test]
    fn mask_marker_is_configurable() {
        let p =
            policy("mask_marker = \"***\"\n[[field]]\npath = \"reason\"\nstrategy = \"mask\"\n");
        let mut e = event();
        p.apply(&mut e);
        assert_eq!(e["reason"], "***");
    }

    #[test]
    fn pseudonyms_are_keyed_hmacs_stable_across_calls_and_policies() {
        let text = "[[field]]\npath = \"user_display_name\"\nstrategy = \"pseudonym\"\n";
        let (a, b) = (policy(text), policy(text));
        let (mut e1, mut e2) = (event(), event());
        assert_eq!(a.apply(&mut e1), ["user_display_name"]);
        b.apply(&mut e2);
        assert_eq!(e1["user_display_name"], expected_pseudonym("Jane Roe"));
        assert_eq!(e1["user_display_name"], e2["user_display_name"]);
        let pseud = e1["user_display_name"].as_str().expect("string");
        assert_eq!(pseud.len(), "pseud:".len() + 16);

        // Another key, another pseudonym; another value, another pseudonym.
        let other = RedactionPolicy::from_toml(text, Some("x".repeat(32).into())).expect("ok");
        let mut e3 = event();
        other.apply(&mut e3);
        assert_ne!(e3["user_display_name"], e1["user_display_name"]);
        let mut e4 = json!({ "user_display_name": "John Doe" });
        a.apply(&mut e4);
        assert_ne!(e4["user_display_name"], e1["user_display_name"]);
    }

    #[test]
    fn a_pseudonym_matches_the_documented_openssl_derivation() {
        // docs/redaction.md: printf '%s' 'Jane Roe' | openssl dgst -sha256 -hmac "$KEY"
        let p = policy("[[field]]\npath = \"user_display_name\"\nstrategy = \"pseudonym\"\n");
        let mut e = json!({ "user_display_name": "Jane Roe" });
        p.apply(&mut e);
        assert_eq!(e["user_display_name"], "pseud:659cd57ab1c38a31");
    }

    #[test]
    fn a_non_string_is_pseudonymized_over_its_canonical_json() {
        let p = policy("[[field]]\npath = \"old_value.*\"\nstrategy = \"pseudonym\"\n");
        let mut e = json!({ "old_value": { "n": 42, "o": { "b": 1, "a": [true, null, "x"] } } });
        p.apply(&mut e);
        assert_eq!(e["old_value"]["n"], expected_pseudonym("42"));
        assert_eq!(
            e["old_value"]["o"],
            expected_pseudonym(r#"{"a":[true,null,"x"],"b":1}"#)
        );
    }

    #[test]
    fn truncate_ip_keeps_the_network_and_masks_what_is_no_address() {
        let p = policy("[[field]]\npath = \"metadata.ip_address\"\nstrategy = \"truncate_ip\"\n");
        let cases = [
            ("10.1.2.3", "10.1.2.0/24"),
            (" 192.168.17.254 ", "192.168.17.0/24"),
            ("10.1.2.3:8443", "10.1.2.0/24"),
            ("2001:db8:85a3:8d3:1319:8a2e:370:7348", "2001:db8:85a3::/48"),
            ("[2001:db8:1::7]:443", "2001:db8:1::/48"),
            ("::1", "::/48"),
            ("::ffff:10.9.8.7", "10.9.8.0/24"),
            ("unknown", "[redacted]"),
            ("10.1.2.3, 10.4.5.6", "[redacted]"),
            ("10.1.2.0/24", "[redacted]"),
        ];
        for (input, output) in cases {
            let mut e = json!({ "metadata": { "ip_address": input } });
            assert_eq!(p.apply(&mut e), ["metadata.ip_address"], "{input}");
            assert_eq!(e["metadata"]["ip_address"], output, "{input}");
        }
        let mut e = json!({ "metadata": { "ip_address": 167837955 } });
        p.apply(&mut e);
        assert_eq!(e["metadata"]["ip_address"], "[redacted]");
    }

    #[test]
    fn nulls_and_absent_fields_are_left_alone() {
        let p = default_policy();
        let mut e = json!({ "user_display_name": null, "metadata": null, "reason": null });
        assert!(p.apply(&mut e).is_empty());
        assert_eq!(
            e,
            json!({ "user_display_name": null, "metadata": null, "reason": null })
        );
    }

    #[test]
    fn wildcards_match_any_key_or_element_and_report_concrete_paths() {
        let p = policy(
            r#"
            [[field]]
            path = "new_value.contacts.*.email"
            strategy = "drop"
            [[field]]
            path = "new_value.contacts.1.name"
            strategy = "mask"
            [[field]]
            path = "old_value.*.email"
            strategy = "mask"
            "#,
        );
        let mut e = event();
        assert_eq!(
            p.apply(&mut e),
            [
                "new_value.contacts.0.email",
                "new_value.contacts.1.email",
                "new_value.contacts.1.name",
                "old_value.qp.email",
            ]
        );
        assert_eq!(
            e["new_value"]["contacts"],
            json!([{ "name": "A", "phone": "+41 79 123 45 67" }, { "name": "[redacted]" }])
        );
        assert_eq!(e["old_value"]["qp"]["email"], "[redacted]");
    }

    #[test]
    fn a_numeric_segment_matches_an_array_index_or_an_object_key() {
        let p = policy("[[field]]\npath = \"new_value.0\"\nstrategy = \"mask\"\n");
        let mut arr = json!({ "new_value": ["a", "b"] });
        assert_eq!(p.apply(&mut arr), ["new_value.0"]);
        assert_eq!(arr["new_value"], json!(["[redacted]", "b"]));
        let mut obj = json!({ "new_value": { "0": "a", "1": "b" } });
        assert_eq!(p.apply(&mut obj), ["new_value.0"]);
        assert_eq!(obj["new_value"], json!({ "0": "[redacted]", "1": "b" }));
    }

    #[test]
    fn dropping_an_array_element_keeps_the_positions() {
        let p = policy("[[field]]\npath = \"compliance_flags.*\"\nstrategy = \"drop\"\n");
        let mut e = json!({ "compliance_flags": ["GMP", "GACP"] });
        assert_eq!(
            p.apply(&mut e),
            ["compliance_flags.0", "compliance_flags.1"]
        );
        assert_eq!(e["compliance_flags"], json!([null, null]));
    }

    #[test]
    fn overlapping_rules_apply_the_one_that_reveals_less() {
        let p = policy(
            r#"
            [[field]]
            path = "new_value.contacts.*.name"
            strategy = "pseudonym"
            [[field]]
            path = "new_value.contacts.0.name"
            strategy = "drop"
            [[field]]
            path = "new_value.contacts.*.phone"
            strategy = "mask"
            keep_last = 2
            [[field]]
            path = "new_value.*.0.phone"
            strategy = "mask"
            "#,
        );
        let mut e = event();
        p.apply(&mut e);
        let contacts = &e["new_value"]["contacts"];
        assert!(contacts[0].get("name").is_none());
        assert_eq!(contacts[0]["phone"], "[redacted]");
        assert_eq!(contacts[1]["name"], expected_pseudonym("B"));
    }

    #[test]
    fn a_field_rule_wins_over_a_pattern_on_the_same_value() {
        let p = policy(
            r#"
            [[field]]
            path = "reason"
            strategy = "pseudonym"
            [[pattern]]
            kind = "phone"
            strategy = "mask"
            roots = ["reason"]
            "#,
        );
        let mut e = event();
        assert_eq!(p.apply(&mut e), ["reason"]);
        assert_eq!(
            e["reason"],
            expected_pseudonym("CoA received from supplier, call +1 (555) 123-4567")
        );
    }

    #[test]
    fn patterns_redact_only_the_matched_text_at_any_depth_under_their_roots() {
        let p = policy(
            r#"
            [[pattern]]
            kind = "email"
            strategy = "pseudonym"
            roots = ["reason", "old_value", "new_value"]
            [[pattern]]
            kind = "phone"
            strategy = "drop"
            roots = ["reason", "new_value"]
            "#,
        );
        let mut e = event();
        assert_eq!(
            p.apply(&mut e),
            [
                "new_value.contacts.0.email",
                "new_value.contacts.0.phone",
                "new_value.contacts.1.email",
                "new_value.note",
                "old_value.qp.email",
                "reason",
            ]
        );
        assert_eq!(e["reason"], "CoA received from supplier, call ");
        assert_eq!(
            e["new_value"]["note"],
            format!(
                "Released after review; questions to {} or .",
                expected_pseudonym("qa@plant.example")
            )
        );
        assert_eq!(e["new_value"]["contacts"][0]["phone"], "");
        // Outside the roots nothing is scanned; non-strings are left as they are.
        assert_eq!(e["user_display_name"], "Jane Roe");
        assert_eq!(e["new_value"]["status"], "RELEASED");
    }

    #[test]
    fn patterns_with_keep_last_mask_each_match() {
        let p = policy(
            "[[pattern]]\nkind = \"phone\"\nstrategy = \"mask\"\nkeep_last = 2\nroots = [\"reason\"]\n",
        );
        let mut e = json!({ "reason": "a +41 79 123 45 67 b 079 765 43 21" });
        p.apply(&mut e);
        assert_eq!(e["reason"], "a [redacted]67 b [redacted]21");
    }

    #[test]
    fn email_addresses_are_found_and_lookalikes_are_not() {
        for (input, output) in [
            ("jane.roe@plant.example", "[redacted]"),
            (
                "mail <Jane.Roe+qa@sub.plant-1.example.co.uk>.",
                "mail <[redacted]>.",
            ),
            ("mailto:jörg@exämple.de please", "mailto:[redacted] please"),
            ("a@b.example, c_d@e.example", "[redacted], [redacted]"),
            ("x@xn--bcher-kva.example", "[redacted]"),
        ] {
            assert_eq!(scrub(input), output, "{input}");
        }
        for input in [
            "lodash@4.17.21",
            "admin@localhost",
            "@mention",
            "user@",
            "a @ b.example",
            "price: 12@3.5",
        ] {
            assert_eq!(scrub(input), input, "{input}");
        }
    }

    #[test]
    fn phone_numbers_in_international_and_national_formats_are_found() {
        for (input, output) in [
            ("+41 79 123 45 67", "[redacted]"),
            ("+41791234567", "[redacted]"),
            ("call +1 (555) 123-4567 now", "call [redacted] now"),
            ("+44 (0)20 7946 0958", "[redacted]"),
            ("+44 (0) 20 7946 0958", "[redacted]"),
            ("+49-30-1234567", "[redacted]"),
            ("+33.1.23.45.67.89", "[redacted]"),
            ("tel:+41 44 668 18 00", "tel:[redacted]"),
            ("0041 79 123 45 67", "[redacted]"),
            ("(555) 123-4567", "[redacted]"),
            ("(020) 7946 0958", "[redacted]"),
            ("555-123-4567.", "[redacted]."),
            ("1-555-123-4567", "[redacted]"),
            ("555.123.4567", "[redacted]"),
            ("079 123 45 67", "[redacted]"),
            ("020 7946 0958", "[redacted]"),
            ("06 12 34 56 78", "[redacted]"),
            ("06.12.34.56.78", "[redacted]"),
            ("030 1234567", "[redacted]"),
            (
                "Tel. 079 123 45 67, Fax 079 123 45 68",
                "Tel. [redacted], Fax [redacted]",
            ),
            ("room 2 079 123 45 67", "room 2 [redacted]"),
            ("(+41 79 123 45 67)", "([redacted])"),
            // A phone number and an e-mail address that overlap are redacted as one.
            ("079 123 45 67.jane@x.example", "[redacted]"),
            ("+41791234567@sms.example", "[redacted]"),
        ] {
            assert_eq!(scrub(input), output, "{input}");
        }
    }

    #[test]
    fn ids_timestamps_uuids_and_numbers_are_not_phone_numbers() {
        for input in [
            "0b7e6f2a-52a4-4a8e-9a51-4f6f4c1d2e3f",
            "12345678-1234-1234-1234-123456789012",
            "2026-03-01T10:15:00.123456+01:00",
            "2026-03-01 10:15:00",
            "01.03.2026 10:15",
            "03/01/2026",
            "01-03-2026",
            "1764000000",
            "1764000000123",
            "weight 1234567.89 kg",
            "+12345.6789",
            "-1234567.5",
            "3.14159265358979",
            "1 234 567,89 EUR",
            "1 000 000 000 000",
            "192.168.100.200",
            "version 10.2.3.4",
            "B-2026-0042-0001",
            "LOT 0012 3456 78",
            "order #555-123-4567",
            "ref 123-456-7890-12",
            "sha 5f6874da1234567890",
            "10 20 30 40 50 60 70 80",
        ] {
            assert_eq!(scrub(input), input, "{input}");
        }
    }

    #[test]
    fn digest_ignores_order_formatting_and_the_key_but_not_the_rules() {
        let a = policy(
            r#"
            version = 1
            [[field]]
            path = "session_id"
            strategy = "drop"
            [[field]]
            path = "user_display_name"
            strategy = "pseudonym"
            [[pattern]]
            kind = "email"
            strategy = "mask"
            roots = ["reason", "new_value"]
            "#,
        );
        let b = RedactionPolicy::from_toml(
            r#"
# same rules, other order and layout
pattern = [ { kind = "email", roots = ["new_value"], strategy = "mask" },
            { kind = "email", roots = ["reason"], strategy = "mask", keep_last = 0 } ]
mask_marker = "[redacted]"
field = [ { strategy = "pseudonym", path = "user_display_name" },
          { path = "session_id", strategy = "drop" } ]
"#,
            Some("another key, as long as it needs to be".to_owned().into()),
        )
        .expect("valid");
        assert_eq!(a.digest(), b.digest());

        let c = policy(
            r#"
            [[field]]
            path = "session_id"
            strategy = "mask"
            [[field]]
            path = "user_display_name"
            strategy = "pseudonym"
            [[pattern]]
            kind = "email"
            strategy = "mask"
            roots = ["reason", "new_value"]
            "#,
        );
        assert_ne!(a.digest(), c.digest());
    }

    #[test]
    fn digest_is_sha256_of_the_documented_canonical_form() {
        let p = policy(
            r#"
            [[pattern]]
            kind = "phone"
            strategy = "mask"
            keep_last = 2
            roots = ["reason"]
            [[field]]
            path = "metadata.ip_address"
            strategy = "truncate_ip"
            "#,
        );
        let canonical = "audit-consumer redaction policy v1\n\
            [\"field\",\"metadata.ip_address\",\"truncate_ip\",null]\n\
            [\"mask_marker\",\"[redacted]\"]\n\
            [\"pattern\",\"phone\",\"reason\",\"mask\",2]\n";
        assert_eq!(p.digest(), <[u8; 32]>::from(Sha256::digest(canonical)));
        // The example in docs/redaction.md.
        assert_eq!(
            hex::encode(p.digest()),
            "379b26198ae12ff24785cfbcf40d44a099eb1d87c092f7511778886f11d8ac9f"
        );
    }

    #[test]
    fn the_default_policy_redacts_a_realistic_event() {
        let p = default_policy();
        let mut e = event();
        let redacted = p.apply(&mut e);
        assert_eq!(
            redacted,
            [
                "metadata.ip_address",
                "metadata.user_agent",
                "new_value.contacts.0.email",
                "new_value.contacts.0.phone",
                "new_value.contacts.1.email",
                "new_value.note",
                "old_value.qp.email",
                "reason",
                "session_id",
                "user_display_name",
            ]
        );
        assert_eq!(e["user_display_name"], expected_pseudonym("Jane Roe"));
        assert!(e.get("session_id").is_none());
        assert_eq!(e["metadata"]["ip_address"], "10.1.2.0/24");
        assert_eq!(e["metadata"]["user_agent"], "[redacted]");
        assert_eq!(e["reason"], "CoA received from supplier, call [redacted]");
        // What proves the row is untouched.
        let original = event();
        for field in PROOF_FIELDS {
            assert_eq!(e[field], original[field], "{field}");
        }
        assert!(!p.is_empty());
    }

    #[test]
    fn an_empty_policy_changes_nothing() {
        let p = policy("# nothing\n");
        assert!(p.is_empty());
        let mut e = event();
        assert!(p.apply(&mut e).is_empty());
        assert_eq!(e, event());
    }

    #[test]
    fn hostile_shapes_never_panic() {
        let p = policy(
            r#"
            [[field]]
            path = "metadata.ip_address"
            strategy = "truncate_ip"
            [[field]]
            path = "new_value.*.*.email"
            strategy = "pseudonym"
            [[field]]
            path = "user_display_name"
            strategy = "mask"
            keep_last = 3
            [[field]]
            path = "compliance_flags.3"
            strategy = "drop"
            [[pattern]]
            kind = "email"
            strategy = "mask"
            roots = ["reason", "old_value", "new_value"]
            [[pattern]]
            kind = "phone"
            strategy = "mask"
            roots = ["reason", "old_value", "new_value"]
            "#,
        );
        for mut shape in [
            json!(null),
            json!([1, 2, 3]),
            json!("a string event"),
            json!(42),
            json!({ "metadata": [1, 2, 3] }),
            json!({ "metadata": "10.1.2.3" }),
            json!({ "metadata": { "ip_address": { "v4": "10.1.2.3" } } }),
            json!({ "metadata": { "ip_address": [] } }),
            json!({ "user_display_name": 12 }),
            json!({ "user_display_name": "é" }),
            json!({ "user_display_name": "日本語の名前" }),
            json!({ "new_value": 12 }),
            json!({ "new_value": [[{ "email": 1 }], { "x": [] }] }),
            json!({ "new_value": { "a": "x".repeat(100_000) } }),
            json!({ "new_value": { "a": "1 ".repeat(10_000) } }),
            json!({ "new_value": { "a": "+4".repeat(10_000) } }),
            json!({ "new_value": { "a": "@.".repeat(10_000) } }),
            json!({ "reason": ["not", "a", "string", "+41 79 123 45 67"] }),
            json!({ "compliance_flags": "GMP" }),
            json!({ "compliance_flags": [1] }),
            json!({ "old_value": { "": { "": "" } } }),
        ] {
            let _ = p.apply(&mut shape);
        }
        let mut e = json!({ "reason": ["+41 79 123 45 67"] });
        assert_eq!(p.apply(&mut e), ["reason.0"]);
    }

    #[test]
    fn nesting_deeper_than_the_bound_is_masked_whole() {
        let p = default_policy();
        let mut deep = json!("jane@x.example");
        for _ in 0..1_000 {
            deep = json!({ "a": deep });
        }
        let mut e = json!({ "new_value": deep });
        let redacted = p.apply(&mut e);
        assert_eq!(redacted.len(), 1);
        // The event object is level 1, `new_value` level 2: the first level past the bound is
        // replaced.
        let expected = std::iter::repeat_n("a", MAX_DEPTH - 1)
            .collect::<Vec<_>>()
            .join(".");
        assert_eq!(redacted[0], format!("new_value.{expected}"));
        let mut v = &e["new_value"];
        for _ in 0..MAX_DEPTH - 1 {
            v = &v["a"];
        }
        assert_eq!(v, "[redacted]");

        // Within the bound everything is scanned.
        let mut ok = json!("jane@x.example");
        for _ in 0..100 {
            ok = json!([ok]);
        }
        let mut e = json!({ "old_value": ok });
        let redacted = p.apply(&mut e);
        assert_eq!(redacted.len(), 1);
        assert!(redacted[0].ends_with(".0"));
        assert!(!e.to_string().contains("jane@"));
    }

    #[test]
    fn each_kind_of_bad_policy_is_named() {
        let cases = [
            (
                "[[field]]\npath = \"\"\nstrategy = \"drop\"",
                "field rule 1 (path \"\"): the path is empty",
            ),
            (
                "[[field]]\npath = \"metadata..ip\"\nstrategy = \"drop\"",
                "empty segment",
            ),
            (
                "[[field]]\npath = \" reason\"\nstrategy = \"drop\"",
                "whitespace",
            ),
            (
                "[[field]]\npath = \"new_value.**\"\nstrategy = \"drop\"",
                "segment \"**\"",
            ),
            (
                "[[field]]\npath = \"*\"\nstrategy = \"drop\"",
                "cannot start with `*`",
            ),
            (
                "[[field]]\npath = \"payload_sha256\"\nstrategy = \"mask\"",
                "`payload_sha256` identifies or proves the row",
            ),
            (
                "[[field]]\npath = \"usr_id\"\nstrategy = \"mask\"",
                "unknown field \"usr_id\"",
            ),
            (
                "[[field]]\npath = \"reason.text\"\nstrategy = \"mask\"",
                "`reason` holds a single value",
            ),
            (
                "[[field]]\npath = \"reason\"\nstrategy = \"hash\"",
                "field rule 1 (path \"reason\"): unknown strategy \"hash\"",
            ),
            ("[[field]]\npath = \"reason\"", "`strategy` is missing"),
            (
                "[[field]]\nstrategy = \"drop\"",
                "field rule 1: `path` is missing",
            ),
            (
                "[[field]]\npath = \"reason\"\nstrategy = \"drop\"\nkeep_last = 2",
                "keep_last only applies to the mask strategy",
            ),
            (
                "[[field]]\npath = \"reason\"\nstrategy = \"mask\"\nkeep_last = 99",
                "keep_last = 99 is outside 0..=16",
            ),
            (
                "[[field]]\npath = \"reason\"\nstrategy = \"mask\"\n[[field]]\npath = \"reason\"\nstrategy = \"drop\"",
                "field rule 2 (path \"reason\"): the path is already given by field rule 1",
            ),
            (
                "[[pattern]]\nkind = \"ssn\"\nstrategy = \"mask\"\nroots = [\"reason\"]",
                "pattern rule 1: unknown kind \"ssn\"",
            ),
            (
                "[[pattern]]\nstrategy = \"mask\"\nroots = [\"reason\"]",
                "`kind` is missing",
            ),
            (
                "[[pattern]]\nkind = \"email\"\nstrategy = \"mask\"\nroots = []",
                "pattern rule 1 (email): `roots` is missing or empty",
            ),
            (
                "[[pattern]]\nkind = \"email\"\nstrategy = \"mask\"\nroots = [\"resaon\"]",
                "root \"resaon\": unknown field",
            ),
            (
                "[[pattern]]\nkind = \"email\"\nstrategy = \"truncate_ip\"\nroots = [\"reason\"]",
                "truncate_ip applies to IP address fields",
            ),
            (
                "[[pattern]]\nkind = \"email\"\nstrategy = \"mask\"\nroots = [\"reason\", \"reason\"]",
                "root \"reason\" is already scanned for email by pattern rule 1",
            ),
            ("version = 2", "version 2 is not supported"),
            (
                "mask_marker = \"\"",
                "mask_marker: must be 1 to 64 characters",
            ),
            (
                "[[field]]\npath = \"reason\"\nstrategy = \"drop\"\nstrat = 1",
                "not valid: line 4, column 1: unknown field `strat`",
            ),
            (
                "[[fields]]\npath = \"reason\"",
                "not valid: line 1, column 3: unknown field `fields`",
            ),
            ("[[field]\n", "not valid: line 1"),
            (
                "[[field]]\npath = 3\nstrategy = \"drop\"",
                "not valid: line 2, column 8: invalid type",
            ),
        ];
        for (text, expected) in cases {
            let message = error(text);
            assert!(
                message.contains(expected),
                "{text:?}\n gave: {message}\n want: {expected}"
            );
        }
    }

    #[test]
    fn too_many_wildcards_are_refused_not_compiled_forever() {
        let mut text = String::new();
        for i in 0..40 {
            let path: Vec<String> = (0..40)
                .map(|j| if j == i { format!("k{j}") } else { "*".into() })
                .collect();
            text.push_str(&format!(
                "[[field]]\npath = \"new_value.{}\"\nstrategy = \"mask\"\n",
                path.join(".")
            ));
        }
        assert!(error(&text).contains("compile to more than"));
    }

    #[test]
    fn pseudonyms_need_a_key_of_32_bytes_and_other_policies_need_none() {
        let text = "[[field]]\npath = \"user_display_name\"\nstrategy = \"pseudonym\"\n\
                    [[pattern]]\nkind = \"email\"\nstrategy = \"pseudonym\"\nroots = [\"reason\"]\n";
        let missing = RedactionPolicy::from_toml(text, None)
            .expect_err("no key")
            .to_string();
        assert!(
            missing.contains("pseudonymizes (field user_display_name; email in reason)"),
            "{missing}"
        );
        assert!(missing.contains("no pseudonym key was given"), "{missing}");
        let weak = RedactionPolicy::from_toml(text, Some("short".to_owned().into()))
            .expect_err("weak key")
            .to_string();
        assert!(weak.contains("has 5 bytes; at least 32"), "{weak}");
        assert!(
            RedactionPolicy::from_toml(
                "[[field]]\npath = \"session_id\"\nstrategy = \"drop\"\n",
                None
            )
            .is_ok()
        );
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("redaction-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("policy.toml");
        std::fs::write(&file, "[[field]]\npath = \"reason\"\nstrategy = \"hash\"\n")
            .expect("write");
        let message = RedactionPolicy::load(&file, key())
            .expect_err("bad")
            .to_string();
        assert!(message.starts_with(&format!(
            "redaction policy {}: field rule 1",
            file.display()
        )));
        let missing = RedactionPolicy::load(&dir.join("absent.toml"), key())
            .expect_err("absent")
            .to_string();
        assert!(
            missing.starts_with("cannot read the redaction policy"),
            "{missing}"
        );
        std::fs::write(&file, include_str!("../../config/redaction.toml")).expect("write");
        assert!(RedactionPolicy::load(&file, key()).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn debug_output_shows_no_key() {
        let text = format!("{:?}", default_policy());
        assert!(!text.contains(KEY), "{text}");
        assert!(text.contains("[secret]"));
    }

    /// Cost per event of the default policy; run with
    /// `cargo test --release --lib api::redaction -- --ignored --nocapture`. Each event is
    /// cloned just before it is redacted (as an export builds each row just before it), and the
    /// cost of the clone alone is subtracted.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost_per_event() {
        let p = default_policy();
        let rich: Vec<Value> = (0..5_000)
            .map(|i| {
                let mut e = event();
                e["user_display_name"] = json!(format!("Operator {i}"));
                e["metadata"]["ip_address"] =
                    json!(format!("10.{}.{}.{}", i % 7, i % 200, i % 250));
                e["new_value"]["weight_g"] = json!(1250.5 + f64::from(i));
                e["new_value"]["batch"] = json!(format!("B-2026-{i:06}"));
                e["old_value"]["checked_at"] = json!("2026-03-01T10:15:00.123456+01:00");
                e
            })
            .collect();
        // A typical event: PII only in the fields the field rules name, none in the free text.
        let plain: Vec<Value> = rich
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut e = e.clone();
                e["old_value"] = json!({ "status": "QUARANTINE", "checked_at": "2026-03-01T10:15:00.123456+01:00" });
                e["new_value"] = json!({
                    "status": "RELEASED", "batch": format!("B-2026-{i:06}"),
                    "weight_g": 1250.5, "room": "GR-04", "lot": "L-0042-7",
                    "note": "Released after QP review of the batch record and the CoA."
                });
                e["reason"] = json!("Scheduled release, deviation DV-2026-0012 closed");
                e
            })
            .collect();
        for (name, events) in [("rich", &rich), ("plain", &plain)] {
            let bytes: usize = events.iter().map(|e| e.to_string().len()).sum();
            let mut paths = 0;
            let (mut with, mut without) = (f64::MAX, f64::MAX);
            for _ in 0..10 {
                let started = std::time::Instant::now();
                for e in events {
                    let mut e = e.clone();
                    paths += p.apply(&mut e).len();
                    std::hint::black_box(&e);
                }
                with = with.min(started.elapsed().as_secs_f64());
                let started = std::time::Instant::now();
                for e in events {
                    std::hint::black_box(&e.clone());
                }
                without = without.min(started.elapsed().as_secs_f64());
            }
            let n = events.len() as f64;
            println!(
                "default policy, {name} events ({} bytes of JSON, {:.1} paths redacted each): \
                 {:.2} µs per event (clone alone {:.2} µs)",
                bytes / events.len(),
                paths as f64 / (n * 10.0),
                (with - without) * 1e6 / n,
                without * 1e6 / n,
            );
        }
    }
}
