//! The local identity provider (Keycloak from `deploy/local/stack.sh ensure keycloak`), its
//! test users (one per test, with the roles it needs) and their tokens, and the read side
//! (`audit-consumer serve`) as a child process.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{World, unique, wait_until};

/// An HTTP client for the tests (reqwest's rustls takes the process's crypto provider: ring,
/// as in `serve`).
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The identity provider of the local stack.
pub struct Idp {
    pub url: String,
    pub realm: String,
    pub issuer: String,
    admin_script: PathBuf,
}

/// A realm user made for one test.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub password: String,
}

/// Starts Keycloak once for this test binary (a no-op when it runs) and returns its facts.
pub fn idp() -> &'static Idp {
    static IDP: OnceLock<Idp> = OnceLock::new();
    IDP.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let status = Command::new("bash")
            .arg(root.join("deploy/local/stack.sh"))
            .args(["ensure", "keycloak"])
            .status()
            .expect("run stack.sh ensure keycloak");
        assert!(status.success(), "stack.sh ensure keycloak failed");
        let url = env_or("KEYCLOAK_URL", "http://127.0.0.1:18080");
        let realm = env_or("KEYCLOAK_REALM", "audit");
        Idp {
            issuer: env_or("KEYCLOAK_ISSUER", &format!("{url}/realms/{realm}")),
            url,
            realm,
            admin_script: root.join("deploy/local/keycloak/admin.sh"),
        }
    })
}

impl Idp {
    fn admin(&self, args: &[&str]) -> String {
        let output = Command::new("bash")
            .arg(&self.admin_script)
            .args(args)
            .output()
            .expect("run admin.sh");
        assert!(
            output.status.success(),
            "admin.sh {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// A fresh user of the realm with these realm roles.
    pub fn user(&self, roles: &[&str]) -> TestUser {
        let name = unique("user-");
        let password = "Test-user-1".to_owned();
        let mut args = vec!["user", "create", name.as_str(), password.as_str()];
        args.extend_from_slice(roles);
        tokio::task::block_in_place(|| self.admin(&args));
        TestUser { name, password }
    }

    /// An access token of `user` (password grant on the realm's CLI client).
    pub async fn token(&self, user: &TestUser) -> String {
        let response: serde_json::Value = http()
            .post(format!(
                "{}/realms/{}/protocol/openid-connect/token",
                self.url, self.realm
            ))
            .form(&[
                ("grant_type", "password"),
                ("client_id", "audit-cli"),
                ("username", user.name.as_str()),
                ("password", user.password.as_str()),
            ])
            .send()
            .await
            .expect("token request")
            .json()
            .await
            .expect("token response");
        response["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access token: {response}"))
            .to_owned()
    }

    /// Adds a newer signing key to the realm; returns its kid.
    pub fn rotate_key(&self) -> String {
        tokio::task::block_in_place(|| self.admin(&["key", "rotate"]))
    }
}

/// `audit-consumer serve` as a child process.
pub struct ApiServer {
    child: Child,
    pub log: PathBuf,
    pub base: String,
    /// Its PostgreSQL login.
    pub pg_user: String,
}

impl ApiServer {
    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl World {
    /// Starts the read side on this world's stores, with its least-privilege logins (SELECT on
    /// PostgreSQL, read on immudb), writing access events to `access_topic`.
    pub async fn start_api(
        &self,
        access_topic: &str,
        overrides: &BTreeMap<&str, String>,
    ) -> ApiServer {
        let idp = idp();
        let (pg_user, pg_password) = self.reader_login().await;
        let (immudb_user, immudb_password) = self.immudb_login(1).await;
        let log = self.workdir.join(format!("{}.log", unique("api-")));
        let log_file = std::fs::File::create(&log).expect("api log");
        let mut env = self.daemon_env(&BTreeMap::new());
        for (k, v) in [
            ("POSTGRES_USERNAME", pg_user.clone()),
            ("POSTGRES_PASSWORD", pg_password),
            ("IMMUDB_USERNAME", immudb_user),
            ("IMMUDB_PASSWORD", immudb_password),
            ("IMMUDB_CREATE_DATABASE", "false".into()),
            ("API_PORT", "0".into()),
            ("API_BIND_ADDRESS", "127.0.0.1".into()),
            (
                "API_CURSOR_KEY",
                "a-test-cursor-key-of-at-least-32-characters".into(),
            ),
            ("API_ACCESS_TOPIC", access_topic.to_owned()),
            ("OIDC_ISSUER", idp.issuer.clone()),
        ] {
            env.insert(k.to_owned(), v);
        }
        for (k, v) in overrides {
            env.insert((*k).to_owned(), v.clone());
        }
        let child = Command::new(env!("CARGO_BIN_EXE_audit-consumer"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("start serve");
        let mut server = ApiServer {
            child,
            log,
            base: String::new(),
            pg_user,
        };
        let address = wait_until("serve to listen", Duration::from_secs(60), || {
            let found = server
                .log_lines()
                .iter()
                .find(|l| l["message"] == "read API listening")
                .and_then(|l| l["address"].as_str().map(str::to_owned));
            async move { found }
        })
        .await;
        server.base = format!("http://{address}");
        let client = http();
        let ready = format!("{}/ready", server.base);
        wait_until("serve to be ready", Duration::from_secs(60), || {
            let request = client.get(&ready).send();
            async move {
                let response = request.await.ok()?;
                (response.status() == 200).then_some(())
            }
        })
        .await;
        server
    }
}
