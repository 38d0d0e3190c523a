//! The read API (`audit-consumer serve`) against the real stack: Kafka, immudb, PostgreSQL and
//! the identity provider (Keycloak). Each test owns its world (topics, schema, database, realm
//! users); the daemon fills the stores, the API is queried over HTTP as a client would.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use audit_consumer::event::payload_sha256;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::idp::{ApiServer, http, idp};
use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const TOPICS: [&str; 2] = ["plant-lifecycle.v1", "financial.v1"];

/// A world filled through the daemon, and the read side on it.
struct Fixture {
    world: World,
    pg: PgPool,
    api: ApiServer,
    access_topic: String,
    http: reqwest::Client,
    events: Vec<(Uuid, Vec<u8>)>,
    _daemon: Daemon,
}

/// One event of the fixture: entity, user and the change it records.
fn audit_event(
    id: Uuid,
    entity: (&str, &str),
    user: &str,
    at: &str,
    old: Value,
    new: Value,
) -> Vec<u8> {
    json!({
        "event_id": id.to_string(),
        "timestamp": at,
        "entity_type": entity.0,
        "entity_id": entity.1,
        "action": "UPDATE",
        "user_id": user,
        "user_display_name": format!("{user} display"),
        "old_value": old,
        "new_value": new,
        "risk_level": if user == "u1" { "HIGH" } else { "LOW" },
        "category": "USER_ACTION",
        "metadata": {"source": "api-test", "version": "1", "ip_address": "10.1.2.3"},
    })
    .to_string()
    .into_bytes()
}

/// 30 events: three entities of 10 steps each (the stage counts up), two users, timestamps
/// shared by threes (ties that the keyset must order by `event_id`).
fn corpus(world: &World) -> Vec<(Uuid, TestRecord)> {
    let entities = [("plant", "p1"), ("plant", "p2"), ("batch", "b1")];
    let mut out = Vec::new();
    for step in 0..10 {
        for (n, entity) in entities.iter().enumerate() {
            let id = Uuid::new_v4();
            let at = format!("2026-11-20T10:00:{:02}.000Z", step * 3 + n / 3);
            let user = if n == 0 { "u1" } else { "u2" };
            let payload = audit_event(
                id,
                *entity,
                user,
                &at,
                json!({"stage": step}),
                json!({"stage": step + 1}),
            );
            out.push((
                id,
                TestRecord {
                    topic: world.topics[n % world.topics.len()].clone(),
                    partition: 0,
                    key: Some(id.to_string().into_bytes()),
                    payload: Some(payload),
                    headers: vec![],
                },
            ));
        }
    }
    out
}

async fn fixture() -> Fixture {
    let world = World::new(&TOPICS, 1).await;
    let access_topic = format!("{}.access", world.id);
    world.create_topic(&access_topic, 1).await;
    let mut topics = world.topics.clone();
    topics.push(access_topic.clone());
    let daemon = world.start_daemon(
        "writer",
        &BTreeMap::from([("KAFKA_TOPICS", topics.join(","))]),
    );
    let corpus = corpus(&world);
    world.produce_corpus(&corpus).await;
    let pg = world.pg().await;
    world
        .wait_rows(&pg, corpus.len() as i64, Duration::from_secs(60))
        .await;
    let api = world.start_api(&access_topic, &BTreeMap::new()).await;
    let events = corpus
        .into_iter()
        .map(|(id, r)| (id, r.payload.expect("payload")))
        .collect();
    Fixture {
        world,
        pg,
        api,
        access_topic,
        http: http(),
        events,
        _daemon: daemon,
    }
}

impl Fixture {
    async fn get(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut request = self.http.get(format!("{}{path}", self.api.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body, headers)
    }

    async fn ok(&self, path: &str, token: &str) -> Value {
        let (status, body, _) = self.get(path, Some(token)).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    async fn bad(&self, path: &str, token: &str, parameter: &str) {
        let (status, body, _) = self.get(path, Some(token)).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["parameter"], parameter, "{path}: {body}");
        assert_eq!(body["status"], 400);
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_owned())
        .collect()
}

fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn searches_filter_and_page_without_gaps_or_repeats() {
    let f = fixture().await;
    let token = idp().token(&idp().user(&["auditor"])).await;

    // Every page of 7, newest first, by the next cursors: all 30 once, in (time, id) order.
    // (The access events of these very reads land in the same table as they are stored: the
    // category keeps them out of the walk.)
    let expected: Vec<String> = sqlx::query_scalar::<_, Uuid>(
        "SELECT event_id FROM audit_trail WHERE category = 'USER_ACTION' \
         ORDER BY event_timestamp DESC, event_id DESC",
    )
    .fetch_all(&f.pg)
    .await
    .expect("ids")
    .into_iter()
    .map(|id| id.to_string())
    .collect();
    let mut pages = vec![f.ok("/api/v1/events?limit=7", &token).await];
    while let Some(next) = pages.last().expect("page")["next_cursor"].as_str() {
        let next = encode(next);
        pages.push(
            f.ok(&format!("/api/v1/events?limit=7&cursor={next}"), &token)
                .await,
        );
    }
    let walked: Vec<String> = pages.iter().flat_map(ids).collect();
    assert_eq!(walked, expected, "forward walk");
    assert_eq!(pages.len(), 5);
    // And back from the last page by the previous cursors: the same pages.
    let mut back = vec![pages.last().expect("last").clone()];
    while let Some(prev) = back.last().expect("page")["prev_cursor"].as_str() {
        let prev = encode(prev);
        back.push(
            f.ok(&format!("/api/v1/events?limit=7&cursor={prev}"), &token)
                .await,
        );
    }
    back.reverse();
    assert_eq!(
        back.iter().map(ids).collect::<Vec<_>>(),
        pages.iter().map(ids).collect::<Vec<_>>(),
        "backward walk"
    );

    // What every row carries to be proven.
    for event in pages[0]["events"].as_array().expect("events") {
        assert!(event["immudb_tx"].as_i64().expect("tx") > 0);
        assert!(
            event["immudb_key"]
                .as_str()
                .expect("key")
                .starts_with("audit:")
        );
        assert_eq!(event["payload_sha256"].as_str().expect("digest").len(), 64);
        assert_eq!(event["immudb_verified"], true);
    }

    // Filters, alone and together, against what PostgreSQL holds.
    for (query, count) in [
        ("user_id=u1", 10),
        ("entity_type=plant&entity_id=p1", 10),
        ("entity_type=plant", 20),
        ("risk_level=HIGH", 10),
        ("category=USER_ACTION&action=UPDATE", 30),
        ("from=2026-11-20T10:00:06Z&to=2026-11-20T10:00:12Z", 6),
        (
            "from=2026-11-20T11:00:06%2B01:00&to=2026-11-20T10:00:12Z",
            6,
        ),
        ("user_id=u2&entity_type=batch&order=asc", 10),
        (&format!("source_topic={}", f.world.topics[0]), 20),
        (
            "ingested_from=2026-01-01T00:00:00Z&category=USER_ACTION",
            30,
        ),
    ] {
        let page = f
            .ok(&format!("/api/v1/events?limit=100&{query}"), &token)
            .await;
        assert_eq!(ids(&page).len(), count, "{query}");
    }
    let ascending = f
        .ok("/api/v1/events?order=asc&limit=3&entity_type=batch", &token)
        .await;
    let times: Vec<&str> = ascending["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["event_timestamp"].as_str().expect("time"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    // Values are bound, never spliced: injection strings match nothing and change nothing.
    for hostile in [
        "u1' OR '1'='1",
        "u1'; DROP TABLE audit_trail; --",
        "\\' OR 1=1 --",
    ] {
        let page = f
            .ok(
                &format!("/api/v1/events?user_id={}", encode(hostile)),
                &token,
            )
            .await;
        assert!(ids(&page).is_empty(), "{hostile}");
    }
    let trail: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_trail WHERE entity_type <> 'audit_trail'")
            .fetch_one(&f.pg)
            .await
            .expect("count");
    assert_eq!(trail, 30, "the trail is intact");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_carries_its_stored_bytes_for_investigators_and_a_proof_on_request() {
    let f = fixture().await;
    let auditor = idp().token(&idp().user(&["auditor"])).await;
    let investigator = idp().token(&idp().user(&["investigator"])).await;
    let (id, original) = f.events[4].clone();

    let seen = f.ok(&format!("/api/v1/events/{id}"), &auditor).await;
    assert_eq!(seen["event"]["event_id"], id.to_string());
    assert!(seen["payload"].is_null(), "{seen}");
    assert!(seen["payload_withheld"].as_str().is_some());
    assert!(seen["verification"].is_null());

    let full = f.ok(&format!("/api/v1/events/{id}"), &investigator).await;
    let payload = full["payload"].as_str().expect("payload for investigators");
    assert_eq!(payload.as_bytes(), original.as_slice(), "byte for byte");
    assert_eq!(
        hex::encode(payload_sha256(payload.as_bytes())),
        full["event"]["payload_sha256"].as_str().expect("digest")
    );

    let proven = f
        .ok(&format!("/api/v1/events/{id}?verify=true"), &auditor)
        .await;
    let verification = &proven["verification"];
    assert_eq!(verification["verdict"], "verified", "{verification}");
    assert_eq!(verification["proof_verified"], true);
    assert_eq!(verification["digest_match"], true);
    assert!(verification["fields_compared"].as_u64().expect("n") >= 20);
    let statement = verification["statement"].as_str().expect("words");
    assert!(
        statement.contains(&format!(
            "included in immudb transaction {}",
            proven["event"]["immudb_tx"]
        )),
        "{statement}"
    );
    assert!(verification["trusted_tx"].as_u64().expect("trusted") >= 1);

    // The replica altered behind the API's back: the proof now says so.
    let mut tx = f.pg.begin().await.expect("begin");
    for sql in [
        "ALTER TABLE audit_trail DISABLE TRIGGER audit_trail_no_update_delete".to_owned(),
        format!("UPDATE audit_trail SET new_value = '{{\"stage\": 99}}' WHERE event_id = '{id}'"),
        "ALTER TABLE audit_trail ENABLE TRIGGER audit_trail_no_update_delete".to_owned(),
    ] {
        sqlx::query(&sql).execute(&mut *tx).await.expect(&sql);
    }
    tx.commit().await.expect("commit");
    let caught = f
        .ok(&format!("/api/v1/events/{id}?verify=true"), &auditor)
        .await;
    let verification = &caught["verification"];
    assert_eq!(verification["verdict"], "mismatch", "{verification}");
    assert_eq!(verification["fields_differing"], json!(["new_value"]));
    assert!(
        verification["statement"]
            .as_str()
            .expect("words")
            .starts_with("NOT VERIFIED")
    );

    let (status, body, _) = f
        .get(
            &format!("/api/v1/events/{}", Uuid::new_v4()),
            Some(&auditor),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["type"], "/problems/not-found");
    f.bad("/api/v1/events/not-a-uuid", &auditor, "event_id")
        .await;
    f.bad(
        &format!("/api/v1/events/{id}?verify=maybe"),
        &auditor,
        "verify",
    )
    .await;
    f.bad(&format!("/api/v1/events/{id}?limit=3"), &auditor, "limit")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entity_history_shows_what_each_event_changed_and_where_it_breaks() {
    let f = fixture().await;
    let token = idp().token(&idp().user(&["auditor"])).await;
    let history = f
        .ok("/api/v1/entities/plant/p1/history?limit=100", &token)
        .await;
    let entries = history["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 10);
    assert_eq!(history["entity_type"], "plant");
    for (step, entry) in entries.iter().enumerate() {
        assert_eq!(entry["event"]["new_value"]["stage"], step + 1);
        assert_eq!(
            entry["changes"],
            json!([{"path": "stage", "old": step, "new": step + 1}])
        );
        let expected = if step == 0 { Value::Null } else { json!(true) };
        assert_eq!(entry["follows_previous"], expected, "step {step}");
    }
    // Pages of 4 cover the same timeline.
    let mut seen = Vec::new();
    let mut path = "/api/v1/entities/plant/p1/history?limit=4".to_owned();
    loop {
        let page = f.ok(&path, &token).await;
        seen.extend(
            page["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .map(|e| e["event"]["event_id"].clone()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => {
                path = format!(
                    "/api/v1/entities/plant/p1/history?limit=4&cursor={}",
                    encode(next)
                )
            }
            None => break,
        }
    }
    let all: Vec<Value> = entries
        .iter()
        .map(|e| e["event"]["event_id"].clone())
        .collect();
    assert_eq!(seen, all);

    // A step that does not start where the previous one ended is flagged.
    let gap = Uuid::new_v4();
    let payload = audit_event(
        gap,
        ("plant", "p1"),
        "u3",
        "2026-11-20T11:00:00Z",
        json!({"stage": 42}),
        json!({"stage": 43}),
    );
    f.world
        .produce(&[TestRecord {
            topic: f.world.topics[0].clone(),
            partition: 0,
            key: None,
            payload: Some(payload),
            headers: vec![],
        }])
        .await;
    wait_until(
        "the gap event to be stored",
        Duration::from_secs(60),
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_trail WHERE event_id = $1")
                .bind(gap)
                .fetch_one(&f.pg)
                .await
                .expect("count");
            (n == 1).then_some(())
        },
    )
    .await;
    let newest_first = f
        .ok(
            "/api/v1/entities/plant/p1/history?order=desc&limit=2",
            &token,
        )
        .await;
    let first = &newest_first["entries"][0];
    assert_eq!(first["event"]["event_id"], gap.to_string());
    assert_eq!(first["follows_previous"], false, "{first}");
    f.bad(
        "/api/v1/entities/plant/p1/history?user_id=u1",
        &token,
        "user_id",
    )
    .await;
}

/// A token whose header or payload we rewrite, keeping the rest.
fn forged(token: &str, header: Option<Value>, payload: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
    payload(&mut claims);
    let header = match header {
        Some(h) => URL_SAFE_NO_PAD.encode(h.to_string()),
        None => parts[0].to_owned(),
    };
    format!(
        "{header}.{}.{}",
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_need_a_valid_token_from_the_issuer_and_a_reading_role() {
    let f = fixture().await;
    let idp = idp();
    let reader_user = idp.user(&["auditor"]);
    let auditor = idp.token(&reader_user).await;
    let kid = {
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(auditor.split('.').next().expect("header"))
                .expect("b64"),
        )
        .expect("json");
        header["kid"].as_str().expect("kid").to_owned()
    };
    let any_id = f.events[0].0.to_string();
    let refused = |status: u16, body: &Value, headers: &reqwest::header::HeaderMap| {
        // Nothing about the trail in a refusal.
        let text = body.to_string();
        assert!(
            !text.contains(&any_id) && !text.contains("audit:"),
            "{text}"
        );
        assert_eq!(body["status"], status);
        if status == 401 {
            assert!(headers.contains_key("www-authenticate"));
        }
    };

    let (status, body, headers) = f.get("/api/v1/events", None).await;
    assert_eq!(status, 401, "{body}");
    refused(status, &body, &headers);

    for roles in [vec![], vec!["report_admin"]] {
        let token = idp.token(&idp.user(&roles)).await;
        let (status, body, headers) = f.get("/api/v1/events", Some(&token)).await;
        assert_eq!(status, 403, "roles {roles:?}: {body}");
        refused(status, &body, &headers);
    }

    let unsigned = forged(&auditor, Some(json!({"alg": "none", "typ": "JWT"})), |_| {});
    let unsigned = format!("{}.", unsigned.rsplit_once('.').expect("dot").0);
    let hmac = forged(
        &auditor,
        Some(json!({"alg": "HS256", "typ": "JWT", "kid": kid})),
        |_| {},
    );
    let escalated = forged(&auditor, None, |claims| {
        claims["realm_access"]["roles"] = json!(["investigator"]);
    });
    let foreign_issuer = http()
        .post(format!(
            "{}/realms/master/protocol/openid-connect/token",
            idp.url
        ))
        .form(&[
            ("grant_type", "password"),
            ("client_id", "admin-cli"),
            (
                "username",
                &std::env::var("KEYCLOAK_ADMIN_USERNAME").unwrap_or_else(|_| "admin".into()),
            ),
            (
                "password",
                &std::env::var("KEYCLOAK_ADMIN_PASSWORD")
                    .unwrap_or_else(|_| "keycloak-local-admin".into()),
            ),
        ])
        .send()
        .await
        .expect("master token")
        .json::<Value>()
        .await
        .expect("json")["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    // A token of the right issuer for another audience (the realm's admin-cli client).
    let other_audience = http()
        .post(format!(
            "{}/realms/{}/protocol/openid-connect/token",
            idp.url, idp.realm
        ))
        .form(&[
            ("grant_type", "password"),
            ("client_id", "admin-cli"),
            ("username", reader_user.name.as_str()),
            ("password", reader_user.password.as_str()),
        ])
        .send()
        .await
        .expect("admin-cli token")
        .json::<Value>()
        .await
        .expect("json")["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    for (what, token) in [
        ("garbage", "not.a.token".to_owned()),
        ("another audience", other_audience),
        ("alg none", unsigned),
        ("HMAC with a published key id", hmac),
        ("claims changed after signing", escalated),
        ("another issuer", foreign_issuer),
    ] {
        let (status, body, headers) = f.get("/api/v1/events", Some(&token)).await;
        assert_eq!(status, 401, "{what}: {body}");
        refused(status, &body, &headers);
    }

    // A signing key added to the realm is picked up by its kid, without a restart.
    let rotated = idp.rotate_key();
    let fresh = idp.token(&idp.user(&["auditor"])).await;
    assert!(fresh.len() > 10 && !rotated.is_empty());
    let fresh_kid: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(fresh.split('.').next().expect("header"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(fresh_kid["kid"], rotated, "new tokens carry the new key");
    f.ok("/api/v1/events?limit=1", &fresh).await;
    f.ok("/api/v1/events?limit=1", &auditor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_the_parameter_named() {
    let f = fixture().await;
    let token = idp().token(&idp().user(&["auditor"])).await;
    let page = f.ok("/api/v1/events?limit=2&user_id=u1", &token).await;
    let cursor = encode(page["next_cursor"].as_str().expect("cursor"));
    let mut flipped = page["next_cursor"].as_str().expect("cursor").to_owned();
    flipped.replace_range(3..4, if &flipped[3..4] == "A" { "B" } else { "A" });
    for (query, parameter) in [
        ("colour=red", "colour"),
        ("from=yesterday", "from"),
        ("to=2026-11-20T10:00:00", "to"),
        ("from=2026-11-21T00:00:00Z&to=2026-11-20T00:00:00Z", "from"),
        (
            "ingested_from=2026-11-21T00:00:00Z&ingested_to=2026-11-20T00:00:00Z",
            "ingested_from",
        ),
        ("limit=1001", "limit"),
        ("limit=0", "limit"),
        ("limit=-5", "limit"),
        ("order=sideways", "order"),
        ("risk_level=EXTREME", "risk_level"),
        ("category=GOSSIP", "category"),
        ("entity_id=p1", "entity_id"),
        ("user_id=u1&user_id=u2", "user_id"),
        ("cursor=forged-by-hand", "cursor"),
        (&format!("cursor={}", encode(&flipped)), "cursor"),
        // A real cursor, but of another query (other filters): foreign.
        (&format!("user_id=u2&limit=2&cursor={cursor}"), "cursor"),
        (&format!("user_id=u1&order=asc&cursor={cursor}"), "cursor"),
    ] {
        f.bad(&format!("/api/v1/events?{query}"), &token, parameter)
            .await;
    }
    // The cursor still works for its own query.
    f.ok(
        &format!("/api/v1/events?limit=2&user_id=u1&cursor={cursor}"),
        &token,
    )
    .await;
    let (status, body, _) = f.get("/api/v1/nothing-here", Some(&token)).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_read_is_recorded_and_stored_in_the_trail_and_an_unrecordable_read_is_refused() {
    let f = fixture().await;
    let user = idp().user(&["investigator"]);
    let token = idp().token(&user).await;
    let subject: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).expect("claims"))
            .expect("b64"),
    )
    .expect("json");
    let subject = subject["sub"].as_str().expect("sub").to_owned();
    let (status, page, headers) = f
        .get("/api/v1/events?user_id=u1&limit=4", Some(&token))
        .await;
    assert_eq!(status, 200, "{page}");
    let request_id = headers["x-request-id"].to_str().expect("id").to_owned();

    // The access topic holds the event...
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &f.world.stack.brokers)
        .set("group.id", unique("access-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&f.access_topic]).expect("subscribe");
    let event: Value = wait_until("the access event", Duration::from_secs(30), || {
        let found = tokio::task::block_in_place(|| {
            consumer
                .poll(Duration::from_millis(200))
                .and_then(Result::ok)
                .and_then(|m| serde_json::from_slice::<Value>(m.payload()?).ok())
                .filter(|e| e["correlation_id"] == request_id)
        });
        async move { found }
    })
    .await;
    assert_eq!(event["user_id"], subject);
    assert_eq!(event["action"], "READ");
    assert_eq!(event["entity_id"], "events");
    assert_eq!(event["new_value"]["route"], "/api/v1/events");
    assert_eq!(event["new_value"]["role"], "investigator");
    assert_eq!(event["new_value"]["username"], user.name);
    assert_eq!(event["new_value"]["rows_returned"], 4);
    assert_eq!(event["new_value"]["parameters"]["filters"]["user_id"], "u1");
    assert!(
        event["user_display_name"]
            .as_str()
            .is_some_and(|n| n.contains(&user.name))
    );

    // ...and the write side stores it in the tamper-evident trail like any event.
    let stored: (String, String, bool) = wait_until(
        "the access event to be stored",
        Duration::from_secs(60),
        || async {
            sqlx::query_as(
                "SELECT user_id, action, immudb_verified FROM audit_trail \
                 WHERE entity_type = 'audit_trail' AND correlation_id = $1",
            )
            .bind(&request_id)
            .fetch_optional(&f.pg)
            .await
            .expect("query")
        },
    )
    .await;
    assert_eq!(stored, (subject, "READ".to_owned(), true));

    // A read side that cannot record its reads returns nothing.
    let blind = f
        .world
        .start_api(
            "not a valid topic name",
            &BTreeMap::from([("POSTGRES_SCHEMA", f.world.pg_schema.clone())]),
        )
        .await;
    let response = f
        .http
        .get(format!("{}/api/v1/events?limit=5", blind.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["type"], "/problems/access-not-recorded", "{body}");
    assert!(body.get("events").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_ends_its_query_in_postgresql() {
    let f = fixture().await;
    let token = idp().token(&idp().user(&["auditor"])).await;
    let reader = f.api.pg_user.clone();
    // Hold the table so the API's query waits in PostgreSQL.
    let mut lock = f.pg.begin().await.expect("begin");
    sqlx::query("LOCK TABLE audit_trail IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let active = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active' \
             AND query LIKE '%FROM audit_trail%'",
        )
        .bind(&reader)
        .fetch_one(&f.pg)
        .await
        .expect("activity")
    };
    let request = tokio::spawn({
        let url = format!("{}/api/v1/events", f.api.base);
        let token = token.clone();
        async move {
            http()
                .get(url)
                .bearer_auth(token)
                .timeout(Duration::from_secs(3))
                .send()
                .await
        }
    });
    wait_until(
        "the query to wait for the lock",
        Duration::from_secs(20),
        || async { (active().await == 1).then_some(()) },
    )
    .await;
    assert!(request.await.expect("task").is_err(), "the client gave up");
    // The lock is still held: only a cancel can end the query now.
    wait_until(
        "the abandoned query to be cancelled",
        Duration::from_secs(20),
        || async { (active().await == 0).then_some(()) },
    )
    .await;
    lock.rollback().await.expect("unlock");
    assert!(
        f.api
            .log_lines()
            .iter()
            .any(|l| l["message"] == "query of a request that went away cancelled")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_is_the_router_and_probes_and_metrics_answer() {
    let f = fixture().await;
    let token = idp().token(&idp().user(&["auditor"])).await;
    let (status, document, _) = f.get("/api/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    let paths: Vec<&str> = document["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        paths,
        vec![
            "/api/v1/entities/{entity_type}/{entity_id}/history",
            "/api/v1/events",
            "/api/v1/events/{event_id}",
        ]
    );
    // Every documented route answers (no 404 from the router) and needs the bearer token.
    let id = f.events[0].0.to_string();
    for path in &paths {
        assert!(
            document["paths"][path]["get"]["security"].is_array(),
            "{path} documents its security"
        );
        let concrete = path
            .replace("{event_id}", &id)
            .replace("{entity_type}", "plant")
            .replace("{entity_id}", "p1");
        f.ok(&concrete, &token).await;
    }
    let (status, ready, _) = f.get("/ready", None).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checks"]["postgres"], true);
    assert_eq!(ready["checks"]["immudb"], true);
    let scrape = f
        .http
        .get(format!("{}/metrics", f.api.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metric_value(
            &scrape,
            "audit_api_requests_total{route=\"/api/v1/events\",status=\"200\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{scrape}"
    );
    assert!(
        metric_value(
            &scrape,
            "audit_api_rows_served_total{route=\"/api/v1/events\"}"
        )
        .is_some_and(|n| n >= 1.0)
    );
    assert!(
        metric_value(
            &scrape,
            "audit_api_access_events_total{outcome=\"recorded\"}"
        )
        .is_some_and(|n| n >= 3.0)
    );
}
