//! The foundation on the real stack: Kafka round trip, migrations and the immutability of the
//! replica, and the `check-config` command line.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn kafka_round_trip_through_rdkafka() {
    let world = World::new(&["roundtrip.v1"], 1).await;
    let topic = world.topics[0].clone();
    let payload = event_json(Uuid::new_v4(), "plant", 1);
    world
        .produce(&[TestRecord {
            topic: topic.clone(),
            partition: 0,
            key: Some(b"k1".to_vec()),
            payload: Some(payload.clone()),
            headers: vec![("h".into(), "v".into())],
        }])
        .await;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &world.stack.brokers)
        .set("group.id", unique("roundtrip"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let received = wait_until("the record to come back", Duration::from_secs(30), || {
        let polled = tokio::task::block_in_place(|| {
            consumer.poll(Duration::from_millis(200)).map(|m| {
                m.map(|m| {
                    (
                        m.key().map(<[u8]>::to_vec),
                        m.payload().map(<[u8]>::to_vec),
                        m.offset(),
                    )
                })
            })
        });
        async move { polled.map(|r| r.expect("consume")) }
    })
    .await;
    assert_eq!(received, (Some(b"k1".to_vec()), Some(payload), 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_rows_cannot_be_updated_deleted_or_truncated() {
    let world = World::new(&["immutability.v1"], 1).await;
    let pg = world.pg().await;
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO audit_trail (event_id, event_timestamp, entity_type, entity_id, action, user_id, \
         immudb_key, immudb_tx, payload_sha256, source_topic, source_partition, source_offset) \
         VALUES ($1, now(), 'plant', 'p1', 'CREATE', 'u1', 'audit:plant:x', 1, $2, 't', 0, 0)",
    )
    .bind(id)
    .bind(vec![7u8; 32])
    .execute(&pg)
    .await
    .expect("insert is allowed");

    // Even the superuser is refused by the triggers.
    for statement in [
        "UPDATE audit_trail SET action = 'DELETE'",
        "DELETE FROM audit_trail",
        "TRUNCATE audit_trail",
    ] {
        let error = sqlx::query(statement)
            .execute(&pg)
            .await
            .expect_err(statement);
        assert!(
            error.to_string().contains("append-only"),
            "{statement}: {error}"
        );
    }
    let action: String = sqlx::query_scalar("SELECT action FROM audit_trail WHERE event_id = $1")
        .bind(id)
        .fetch_one(&pg)
        .await
        .expect("row");
    assert_eq!(action, "CREATE");

    // The daemon's role may read and append, nothing else.
    let privileges: Vec<(String,)> = sqlx::query_as(
        "SELECT privilege_type FROM information_schema.role_table_grants \
         WHERE grantee = 'audit_writer' AND table_schema = $1 AND table_name = 'audit_trail' \
         ORDER BY privilege_type",
    )
    .bind(&world.pg_schema)
    .fetch_all(&pg)
    .await
    .expect("grants");
    let privileges: Vec<&str> = privileges.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(privileges, ["INSERT", "SELECT"]);
}

fn check_config(env: &BTreeMap<&str, String>) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_audit-consumer"))
        .arg("check-config")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run check-config")
}

fn base_env() -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("IMMUDB_PASSWORD", "immudb-pass".to_owned()),
        ("POSTGRES_PASSWORD", "pg-pass".to_owned()),
    ])
}

#[test]
fn check_config_names_the_bad_setting_in_one_line() {
    for (name, value, expected) in [
        (
            "KAFKA_BATCH_SIZE",
            "0",
            "KAFKA_BATCH_SIZE (kafka.batch_size): 0 is below the minimum 1",
        ),
        (
            "KAFKA_BATCH_SIZE",
            "2000",
            "KAFKA_BATCH_SIZE (kafka.batch_size): 2000 is above the maximum 512",
        ),
        (
            "KAFKA_BATCH_TIMEOUT",
            "5 seconds",
            "KAFKA_BATCH_TIMEOUT (kafka.batch_timeout): \"5 seconds\" is not a duration",
        ),
        (
            "KAFKA_BROKERS",
            "",
            "KAFKA_BROKERS (kafka.brokers): must not be empty",
        ),
    ] {
        let mut env = base_env();
        env.insert(name, value.to_owned());
        let output = check_config(&env);
        assert!(!output.status.success(), "{name}={value} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(expected), "{name}={value}: {stderr}");
    }
}

#[test]
fn check_config_reads_secret_files_and_never_prints_them() {
    let dir = std::env::temp_dir().join(unique("check-config-"));
    std::fs::create_dir_all(&dir).expect("dir");
    let secret_file = dir.join("immudb-password");
    let secret = "s3cret-from-file-7f2a";
    std::fs::write(&secret_file, format!("{secret}\n")).expect("write secret");
    let mut env = base_env();
    env.remove("IMMUDB_PASSWORD");
    env.insert(
        "IMMUDB_PASSWORD_FILE",
        secret_file.to_string_lossy().into_owned(),
    );
    env.insert("KAFKA_PROP_SASL_PASSWORD", "kafka-pass-9c1".to_owned());
    let output = check_config(&env);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("configuration is valid"));
    assert!(
        stdout.contains("immudb.password")
            && stdout.contains("[redacted]")
            && stdout.contains("env file"),
        "{stdout}"
    );
    for leaked in [secret, "pg-pass", "kafka-pass-9c1"] {
        assert!(!stdout.contains(leaked), "{leaked} printed: {stdout}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_setting_is_documented_in_the_readme_and_the_default_config() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let default_toml = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
    let config = std::fs::read_to_string(default_toml).expect("default.toml");
    for spec in audit_consumer::config::SETTINGS {
        assert!(
            readme.contains(&format!("`{}`", spec.env)),
            "{} missing from the README table",
            spec.env
        );
        assert!(
            readme.contains(&format!("`{}`", spec.key)),
            "{} missing from the README table",
            spec.key
        );
        let row = if spec.secret {
            format!("| `{}` | `{}` / `{}_FILE` |", spec.key, spec.env, spec.env)
        } else {
            format!(
                "| `{}` | `{}` | `{}` |",
                spec.key,
                spec.env,
                spec.default.unwrap_or("")
            )
        };
        assert!(
            readme.contains(&row),
            "the README table has no row starting {row} (a changed default?)"
        );
        assert!(
            config.contains(&format!("(env {}", spec.env)),
            "{} missing from config/default.toml",
            spec.env
        );
    }
    // Every key of the shipped file, uncommented, is a known setting and its value is valid.
    let uncommented: String = config
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(setting)
                if setting.contains(" = ")
                    && !setting.contains("_file =")
                    && !setting.contains("= \"\"") =>
            {
                setting
            }
            Some(table) if table == "[kafka.properties]" || table.starts_with("\"fetch") => table,
            _ if line.starts_with('#') => "",
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = std::env::temp_dir().join(unique("default-toml-"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("config.toml");
    std::fs::write(&file, &uncommented).expect("write");
    let env = BTreeMap::from([
        ("IMMUDB_PASSWORD".to_owned(), "x".to_owned()),
        ("POSTGRES_PASSWORD".to_owned(), "y".to_owned()),
    ]);
    let loaded = audit_consumer::config::Settings::load(&audit_consumer::config::Sources {
        file: Some(&file),
        env,
    })
    .unwrap_or_else(|e| {
        panic!("config/default.toml uncommented does not load: {e}\n{uncommented}")
    });
    assert_eq!(loaded.settings.kafka.batch_size, 100);
    assert_eq!(loaded.settings.pipeline.immudb_concurrency, 2);
    assert_eq!(
        loaded.settings.immudb.sync_frequency,
        std::time::Duration::from_millis(2)
    );
    assert_eq!(
        loaded.settings.kafka.client_properties["fetch.max.bytes"],
        "16777216"
    );
    std::fs::remove_dir_all(&dir).ok();
}
