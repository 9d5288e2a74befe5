//! Kill -9 the real server in the middle of a burst of commands, start it again: every
//! committed event is there once, and the read models catch up to exactly a rebuild.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use orgledger::store::{Database, MasterKey};
use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "crash-test-token";

struct Server {
    child: Child,
    address: String,
}

/// Starts `orgledger serve` on a free port and waits for its "ready" line.
fn start(url: &str, master_key: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_orgledger"))
        .arg("serve")
        .env("DATABASE_URL", url)
        .env("ORGLEDGER_MASTER_KEY", master_key)
        .env("ORGLEDGER_API_TOKEN", TOKEN)
        .env("ORGLEDGER_BIND", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().unwrap();
    let (found, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<Value>(&line) {
                if entry["message"] == "orgledger ready" {
                    let _ = found.send(entry["address"].as_str().unwrap_or_default().to_owned());
                }
            }
        }
    });
    let address = address
        .recv_timeout(Duration::from_secs(60))
        .expect("the server listens");
    Server {
        child,
        address: format!("http://{address}"),
    }
}

async fn call(
    client: &reqwest::Client,
    server: &str,
    method: reqwest::Method,
    path: &str,
    actor: Option<&str>,
    body: Option<Value>,
) -> Option<(u16, Value)> {
    let mut request = client
        .request(method, format!("{server}{path}"))
        .bearer_auth(TOKEN);
    if let Some(actor) = actor {
        request = request.header("X-Actor-Id", actor);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.unwrap_or(Value::Null)))
}

/// Creates "Acme", owned by olivia; returns its id.
async fn create_acme(client: &reqwest::Client, server: &str) -> String {
    let (status, org) = call(
        client,
        server,
        reqwest::Method::POST,
        "/v1/organizations",
        Some("olivia"),
        Some(
            json!({"name": "Acme", "owner": {"user_id": "olivia", "email": "olivia@example.com"}}),
        ),
    )
    .await
    .expect("the server answers");
    assert_eq!(status, 201, "{org}");
    org["id"].as_str().unwrap().to_owned()
}

on_both_backends!(
    killing_the_server_mid_burst_loses_nothing_and_doubles_nothing,
    sigterm_stops_the_server_cleanly_and_loses_nothing,
);

/// 60 invitations to `org` sent at once; each resolves to its answer, or `None` when the
/// server went away first.
fn burst_of_invitations(
    client: &reqwest::Client,
    server: &str,
    org: &str,
) -> Vec<tokio::task::JoinHandle<Option<(u16, Value)>>> {
    (0..60)
        .map(|i| {
            let (client, server) = (client.clone(), server.to_owned());
            let path = format!("/v1/organizations/{org}/invitations");
            tokio::spawn(async move {
                call(
                    &client,
                    &server,
                    reqwest::Method::POST,
                    &path,
                    Some("olivia"),
                    Some(json!({"email": format!("guest{i}@example.com"), "role": "member"})),
                )
                .await
            })
        })
        .collect()
}

/// `org`'s stored events, read from the log by `system`.
async fn stored_events(client: &reqwest::Client, server: &str, org: &str) -> Vec<Value> {
    let path = format!("/v1/organizations/{org}/events?limit=500");
    let (status, events) = call(client, server, reqwest::Method::GET, &path, None, None)
        .await
        .expect("the server answers");
    assert_eq!(status, 200, "{events}");
    events["items"].as_array().unwrap().clone()
}

fn invitations_sent(events: &[Value]) -> usize {
    events
        .iter()
        .filter(|e| e["event_type"] == "InvitationSent")
        .count()
}

/// SIGTERM (what a service manager sends) in the middle of a burst stops the server
/// cleanly: it exits with success, no request gets a server error, and every acknowledged
/// command is there when it starts again.
async fn sigterm_stops_the_server_cleanly_and_loses_nothing(backend: Backend) {
    let database = fresh_database(backend).await;
    let master_key = MasterKey::generate().to_base64();
    let client = reqwest::Client::new();
    let mut server = start(&database.url, &master_key);
    let org = create_acme(&client, &server.address).await;

    let burst = burst_of_invitations(&client, &server.address, &org);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let signalled = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(signalled.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running 30 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    let mut acknowledged = 0;
    for request in burst {
        match request.await.unwrap() {
            Some((201, _)) => acknowledged += 1,
            // Sixty writers on one organization may outrun its retries: a 409 asking the
            // client to retry is an answer; a server error is not.
            Some((status, body)) if status >= 500 => {
                panic!("answered {status} while stopping: {body}")
            }
            Some(_) | None => {}
        }
    }

    let mut restarted = start(&database.url, &master_key);
    let events = stored_events(&client, &restarted.address, &org).await;
    assert!(
        invitations_sent(&events) >= acknowledged,
        "every acknowledged command is stored: {} < {acknowledged}",
        invitations_sent(&events)
    );
    restarted.child.kill().unwrap();
    restarted.child.wait().unwrap();
}

async fn killing_the_server_mid_burst_loses_nothing_and_doubles_nothing(backend: Backend) {
    let database = fresh_database(backend).await;
    let master_key = MasterKey::generate().to_base64();
    let client = reqwest::Client::new();
    let mut server = start(&database.url, &master_key);
    let org = create_acme(&client, &server.address).await;

    let burst = burst_of_invitations(&client, &server.address, &org);
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.child.kill().expect("SIGKILL");
    server.child.wait().unwrap();
    let mut acknowledged = 0;
    for request in burst {
        if let Some((201, _)) = request.await.unwrap() {
            acknowledged += 1;
        }
    }

    println!("{backend:?}: {acknowledged} of 60 commands acknowledged before the kill");
    let restarted = start(&database.url, &master_key);
    let events = stored_events(&client, &restarted.address, &org).await;
    let sent = invitations_sent(&events);
    println!("{backend:?}: {sent} invitations stored");
    assert!(
        sent >= acknowledged,
        "every acknowledged command is stored: {sent} < {acknowledged}"
    );
    let sequences: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(
        sequences,
        (1..=events.len() as i64).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );

    // The restarted projector catches up to every stored event, each applied once.
    let audit_path = format!("/v1/organizations/{org}/audit-log?limit=500");
    let invitations_path = format!("/v1/organizations/{org}/invitations?status=all&limit=500");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, log) = call(
            &client,
            &restarted.address,
            reqwest::Method::GET,
            &audit_path,
            None,
            None,
        )
        .await
        .unwrap();
        let (_, invitations) = call(
            &client,
            &restarted.address,
            reqwest::Method::GET,
            &invitations_path,
            None,
            None,
        )
        .await
        .unwrap();
        let entries = log["items"].as_array().map_or(0, Vec::len);
        let listed = invitations["items"].as_array().map_or(0, Vec::len);
        assert!(
            entries <= events.len() && listed <= sent,
            "an event was applied twice"
        );
        if (entries, listed) == (events.len(), sent) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "projections did not catch up: {entries} of {}",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut restarted = restarted;
    restarted.child.kill().unwrap();
    restarted.child.wait().unwrap();

    // What the crashed-and-restarted projector built equals a rebuild from the log.
    let db = Database::connect(&database.url).await.unwrap();
    let service = orgledger::service::Orgledger::open(
        db.clone(),
        MasterKey::from_base64(&master_key).unwrap(),
    )
    .await
    .unwrap();
    service.projector.catch_up().await.unwrap();
    let incremental = dump_read_models(&db).await;
    for name in orgledger_projections::PROJECTION_NAMES {
        service.projector.rebuild(name, false).await.unwrap();
    }
    assert_eq!(dump_read_models(&db).await, incremental);
}
