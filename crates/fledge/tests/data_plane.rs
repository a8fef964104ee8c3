//! End-to-end test of issue 12 item 2 through the real binaries: a FedAvg job (a copy of
//! `examples/mnist`) runs on `fledge standalone` while an attacker connected to the platform's
//! broker with a trainer's stolen login, but without data-plane keys, reads every topic of the
//! job, replays every data message it sees, publishes well-formed updates that claim the
//! trainer's id with a huge sample count and absurd weights, and evicts the trainer with an
//! empty retained presence (a sybil's presence would get it disconnected by the broker's ACLs).
//! The job must complete with the global model of an unattacked run of the same job, bit for
//! bit: nothing the attacker sent is accepted (on a plain data plane its updates replace the
//! global model).

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

/// A copy of examples/mnist with `rounds` rounds and one trainer (its first dataset) whose
/// data paths still resolve. One trainer makes FedAvg's result independent of arrival order,
/// so that two runs can be compared bit for bit.
fn mnist_copy(dir: &std::path::Path, rounds: u32) {
    copy_example("mnist", dir);
    let spec = dir.join("modelSpec.json");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replace("\"rounds\": 20", &format!("\"rounds\": {rounds}")))
        .unwrap();
    let data = dir.join("dataSpec.json");
    let text = std::fs::read_to_string(&data).unwrap();
    let one = text.replace(
        r#"["dataset-0.json", "dataset-1.json", "dataset-2.json", "dataset-3.json"]"#,
        r#"["dataset-0.json"]"#,
    );
    assert_ne!(one, text, "examples/mnist/dataSpec.json changed: update this test");
    std::fs::write(&data, one).unwrap();
}

/// The final global model of `job`, as `fledgectl get model` downloads it.
fn final_model(platform: &Platform, job: &str) -> Vec<u8> {
    let file = platform.scratch().join(format!("{job}.safetensors"));
    let out = platform.fledgectl().args(["get", "model", job, "-f"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&file).unwrap()
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
            if job.state.is_final() {
                continue;
            }
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
    options.set_credentials(login.0.clone(), login.1);
    let mut transport = fledge_channel::MqttConfig::new("127.0.0.1", port);
    transport.tls = Some(fledge_channel::MqttTls { ca: Some(ca) });
    transport.apply_transport(&mut options).unwrap();
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    // The broker keeps a login inside its job's topics (and its own presence), so a member
    // attacks its own job.
    let job = login.0.split_once('/').map(|(job, _)| job.to_owned()).unwrap();
    let filter = format!("{}/#", fledge_channel::mqtt::job_topic_prefix(&job));
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
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
                // Evict the trainer whose login it holds (its own presence is all the broker
                // lets it publish; a sybil's would get it disconnected, see
                // `logins_stay_inside_their_job_and_their_own_presence` in fledge-channel).
                if login.0.ends_with(&format!("/{}", parts[6]))
                    && evicted.insert((prefix.clone(), parts[6].to_owned()))
                {
                    let _ = client.try_publish(
                        publish.topic.clone(),
                        QoS::AtLeastOnce,
                        true,
                        Vec::new(),
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
    // The same job without an attacker first: what the attacked one must end with, bit for bit.
    let dir = platform.scratch().join("mnist-alone");
    mnist_copy(&dir, 5);
    let alone = tokio::task::block_in_place(|| platform.run_dir(&dir));
    assert!(
        alone.success,
        "the unattacked job must complete:
{}",
        alone.output
    );
    let expected = final_model(&platform, &alone.job);

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
    assert!(accuracy > 0.8, "accuracy after 5 attacked rounds: {accuracy}");
    assert!(
        final_model(&platform, &outcome.job) == expected,
        "the attacked job's global model differs from the unattacked one's"
    );
}
