//! End-to-end test of issue 12 item 2 through the real binaries: a FedAvg job (a copy of
//! `examples/mnist`) runs on `fledge standalone` while an attacker connected to the platform's
//! broker, without data-plane keys, reads every topic of the job, replays every data message it sees,
//! publishes well-formed updates that claim a trainer's id with a huge sample count and
//! absurd weights, adds a sybil trainer and evicts the real ones with empty retained presences.
//! The job must complete with the accuracy of an unattacked run: nothing the attacker sent is
//! accepted (on a plain data plane its updates replace the global model).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fledge_channel::{Kind, Message, Tensor};
use fledge_types::JobState;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use support::{Platform, copy_example, records_of};

/// A copy of examples/mnist with `rounds` rounds whose data paths still resolve.
fn mnist_copy(dir: &std::path::Path, rounds: u32) {
    copy_example("mnist", dir);
    let spec = dir.join("modelSpec.json");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replace("\"rounds\": 20", &format!("\"rounds\": {rounds}")))
        .unwrap();
}

/// A complete plain message in the chunk layout (version 1), claiming `sender`.
fn plain_chunk(sender: &str, message: &Message, msg_id: u64) -> Vec<u8> {
    let mut m = message.clone();
    m.sender = sender.to_owned();
    let encoded = fledge_channel::wire::encode(&m).unwrap();
    let mut v = b"FLDC\x01".to_vec();
    v.extend_from_slice(&(sender.len() as u16).to_le_bytes());
    v.extend_from_slice(sender.as_bytes());
    v.extend_from_slice(&msg_id.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&(encoded.len() as u64).to_le_bytes());
    v.extend_from_slice(&encoded);
    v
}

/// What the attacker did.
#[derive(Default)]
struct Attacks {
    replayed: AtomicU64,
    forged: AtomicU64,
    presences: AtomicU64,
}

/// A broker login the embedded broker admits: a trainer's of the first job with tasks, derived
/// from the platform's `broker.secret` (the strongest outsider: one that stole a member's
/// broker login, or the secret file, but holds no data-plane key).
async fn stolen_login(client: fledge_client::Client, secret: PathBuf) -> (String, String) {
    for _ in 0..600 {
        for job in client.list_jobs(None).await.unwrap() {
            let tasks = client.list_tasks(&job.id).await.unwrap();
            if let Some(task) = tasks.iter().find(|t| t.role == "trainer") {
                let creds = fledge_control::broker_auth::BrokerCredentials::load_or_create(&secret)
                    .unwrap();
                let user = fledge_control::broker_auth::BrokerCredentials::username(
                    &job.id,
                    &task.task_id,
                );
                return (user, creds.password(&job.id, &task.task_id));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no job with a trainer appeared");
}

/// Connects to the broker (mqtts, trusting `ca`: the attacker holds a stolen login, and TLS
/// does not stop a member) with `login` and attacks every job on it until dropped.
async fn attacker(port: u16, ca: fledge_tls::Ca, login: (String, String), attacks: Arc<Attacks>) {
    let mut options = MqttOptions::new("attacker", "127.0.0.1", port);
    options.set_max_packet_size(64 << 20, 64 << 20);
    options.set_credentials(login.0, login.1);
    let mut transport = fledge_channel::MqttConfig::new("127.0.0.1", port);
    transport.tls = Some(fledge_channel::MqttTls { ca: Some(ca) });
    transport.apply_transport(&mut options).unwrap();
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    client.subscribe("fledge/#", QoS::AtLeastOnce).await.unwrap();
    let mut trainers: BTreeSet<(String, String)> = BTreeSet::new();
    let mut evicted = BTreeSet::new();
    loop {
        let publish = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => p,
            Ok(_) => continue,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // fledge/{job}/{channel}/{group}/{kind}/...
        let parts: Vec<&str> = publish.topic.split('/').collect();
        if parts.len() < 6 || parts[0] != "fledge" {
            continue;
        }
        let prefix = parts[..4].join("/");
        match parts[4] {
            "presence" if parts.len() == 7 && parts[5] == "trainer" => {
                if !publish.payload.is_empty() {
                    trainers.insert((prefix.clone(), parts[6].to_owned()));
                }
                if evicted.insert((prefix.clone(), parts[6].to_owned())) {
                    let _ = client.try_publish(
                        publish.topic.clone(),
                        QoS::AtLeastOnce,
                        true,
                        Vec::new(),
                    );
                    let sybil =
                        serde_json::json!({"role": "trainer", "task_id": "sybil", "props": {}});
                    let _ = client.try_publish(
                        format!("{prefix}/presence/trainer/sybil"),
                        QoS::AtLeastOnce,
                        true,
                        sybil.to_string().into_bytes(),
                    );
                    attacks.presences.fetch_add(1, Ordering::Relaxed);
                }
            }
            "data" => {
                // Replay what the aggregator is sent, and forge an update for each trainer.
                let _ = client.try_publish(
                    publish.topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    publish.payload.to_vec(),
                );
                attacks.replayed.fetch_add(1, Ordering::Relaxed);
                for (_, trainer) in trainers.iter().filter(|(p, _)| *p == prefix) {
                    let forged = Message::new(Kind::Update, 1)
                        .with_meta("numSamples", 1_000_000_000u64)
                        .with_meta("weight", 1_000_000_000u64)
                        .with_tensor("w", Tensor::from_f32(vec![4], &[1e30; 4]).unwrap());
                    let payload = plain_chunk(trainer, &forged, rand_id());
                    let _ =
                        client.try_publish(publish.topic.clone(), QoS::AtLeastOnce, false, payload);
                    attacks.forged.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }
}

fn rand_id() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attacker_on_the_broker_changes_nothing_in_a_fedavg_job() {
    let platform = Platform::start();
    let port = platform.broker_port();
    let attacks = Arc::new(Attacks::default());
    let attack = {
        let attacks = attacks.clone();
        let client = platform.client();
        let secret = platform.data_dir().join("secrets").join("broker.secret");
        let ca = platform.ca();
        tokio::spawn(async move {
            let login = stolen_login(client, secret).await;
            attacker(port, ca, login, attacks).await;
        })
    };

    let dir = platform.scratch().join("mnist-attacked");
    mnist_copy(&dir, 5);
    // fledgectl blocks until the job ends; the attacker runs on the other worker threads.
    let outcome = tokio::task::block_in_place(|| platform.run_dir(&dir));
    attack.abort();
    assert!(outcome.success, "the attacked job must complete:\n{}", outcome.output);
    let (job, _, records) = platform.job(&outcome.job).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    assert!(attacks.forged.load(Ordering::Relaxed) > 0, "the attacker forged no update");
    assert!(attacks.replayed.load(Ordering::Relaxed) > 0, "the attacker replayed nothing");
    assert!(attacks.presences.load(Ordering::Relaxed) > 0, "the attacker evicted no one");
    let rounds = records_of(&records, "aggregator");
    assert_eq!(rounds.len(), 5, "one aggregator record per round");
    let accuracy = rounds[4].metrics["global.accuracy"];
    assert!(accuracy > 0.85, "accuracy after 5 attacked rounds: {accuracy}");
}
