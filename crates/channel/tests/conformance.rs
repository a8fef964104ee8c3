//! One behavioural suite run against every backend: `local`, the embedded rumqttd broker (plain
//! and over TLS), `p2p` against the real metaserver of `fledge-control` and, when
//! `FLEDGE_MOSQUITTO_URL` is set (e.g. `mqtt://127.0.0.1:1883`), a real Mosquitto; over TLS too
//! when `FLEDGE_MOSQUITTO_TLS_URL` (`mqtts://127.0.0.1:18832`) and `FLEDGE_MOSQUITTO_TLS_CA` (the
//! CA's PEM file) are set (`scripts/test-all` generates that CA and starts that listener).

use std::time::Duration;

use futures::StreamExt;

use fledge_channel::{
    Backend, Channel, ChannelOptions, Error, Kind, LocalHub, Message, MqttConfig, P2pConfig, Tensor,
};
use fledge_types::TaskId;

/// Generous bound for anything eventual; no assertion depends on speed.
const PATIENCE: Duration = Duration::from_secs(30);

/// What a backend under test provides.
struct Fixture {
    backend: Backend,
    /// Keeps the embedded broker alive for the test.
    #[cfg(feature = "broker")]
    _broker: Option<fledge_channel::broker::BrokerHandle>,
    /// Stops the metaserver of a p2p fixture when dropped.
    _metaserver: Option<tokio_util::sync::DropGuard>,
    job: String,
    /// Every end gets keys: messages are sealed, presences and hellos signed.
    sealed: bool,
}

impl Fixture {
    fn local() -> Option<Fixture> {
        Some(Fixture {
            backend: Backend::Local(LocalHub::new()),
            #[cfg(feature = "broker")]
            _broker: None,
            _metaserver: None,
            job: unique_job(),
            sealed: false,
        })
    }

    /// `p2p` ends registering with a real metaserver on a free port.
    fn p2p() -> Option<Fixture> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("bound address");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let metaserver =
            fledge_control::metaserver::Options::default().build().expect("default options");
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(metaserver.run(listener, stop.clone()));
        let mut config = P2pConfig::new(format!("http://{addr}"));
        config.heartbeat = Duration::from_millis(200);
        config.liveness_timeout = Duration::from_secs(2);
        Some(Fixture {
            backend: Backend::P2p(config),
            #[cfg(feature = "broker")]
            _broker: None,
            _metaserver: Some(stop.drop_guard()),
            job: unique_job(),
            sealed: false,
        })
    }

    #[cfg(feature = "broker")]
    fn embedded() -> Option<Fixture> {
        let broker = fledge_channel::broker::start_embedded_broker(
            (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        )
        .expect("embedded broker starts");
        let config = fast_liveness(MqttConfig::new("127.0.0.1", broker.addr().port()));
        Some(Fixture {
            backend: Backend::Mqtt(config),
            _broker: Some(broker),
            _metaserver: None,
            job: unique_job(),
            sealed: false,
        })
    }

    /// The embedded broker serving mqtts with a certificate for 127.0.0.1 from a fresh CA,
    /// and clients that trust that CA.
    #[cfg(feature = "broker")]
    fn embedded_tls() -> Option<Fixture> {
        let (broker, ca) = tls_broker(&["127.0.0.1"]);
        let mut config = MqttConfig::parse(&broker.url()).expect("the broker's own url");
        config.tls = Some(fledge_channel::MqttTls { ca: Some(ca) });
        Some(Fixture {
            backend: Backend::Mqtt(fast_liveness(config)),
            _broker: Some(broker),
            _metaserver: None,
            job: unique_job(),
            sealed: false,
        })
    }

    /// Mosquitto's TLS listener (`FLEDGE_MOSQUITTO_TLS_URL`, certificate from the CA in
    /// `FLEDGE_MOSQUITTO_TLS_CA`).
    fn mosquitto_tls() -> Option<Fixture> {
        let (Ok(url), Ok(ca)) =
            (std::env::var("FLEDGE_MOSQUITTO_TLS_URL"), std::env::var("FLEDGE_MOSQUITTO_TLS_CA"))
        else {
            eprintln!("FLEDGE_MOSQUITTO_TLS_URL/_CA not set: skipping the Mosquitto TLS test");
            return None;
        };
        let mut config = MqttConfig::parse(&url).expect("FLEDGE_MOSQUITTO_TLS_URL is an address");
        let ca = fledge_tls::Ca::load(std::path::Path::new(&ca)).expect("FLEDGE_MOSQUITTO_TLS_CA");
        config.tls = Some(fledge_channel::MqttTls { ca: Some(ca) });
        Some(Fixture {
            backend: Backend::Mqtt(fast_liveness(config)),
            #[cfg(feature = "broker")]
            _broker: None,
            _metaserver: None,
            job: unique_job(),
            sealed: false,
        })
    }

    fn mosquitto() -> Option<Fixture> {
        let Ok(url) = std::env::var("FLEDGE_MOSQUITTO_URL") else {
            eprintln!("FLEDGE_MOSQUITTO_URL not set: skipping the Mosquitto conformance test");
            return None;
        };
        let config = MqttConfig::parse(&url).expect("FLEDGE_MOSQUITTO_URL is a broker address");
        Some(Fixture {
            backend: Backend::Mqtt(fast_liveness(config)),
            #[cfg(feature = "broker")]
            _broker: None,
            _metaserver: None,
            job: unique_job(),
            sealed: false,
        })
    }

    /// Whether messages cross a network (encoded, checked by the receiver on arrival).
    fn is_networked(&self) -> bool {
        !matches!(self.backend, Backend::Local(_))
    }

    /// The same backend with keys for every end.
    fn sealed(mut self) -> Fixture {
        self.sealed = true;
        self
    }

    fn opts(&self, channel: &str, group: &str, me: &str, role: &str, peer: &str) -> ChannelOptions {
        let opts = ChannelOptions::new(self.job.as_str(), channel, group, me, role, peer);
        if self.sealed { opts.with_security(keyring(&self.job, channel, me)) } else { opts }
    }

    async fn open(&self, opts: ChannelOptions) -> Channel {
        Channel::open(opts, self.backend.clone()).await.expect("channel opens")
    }

    /// An aggregator and `n` trainers on channel `param` group `default`.
    async fn star(&self, n: usize) -> (Channel, Vec<Channel>) {
        let agg = self.open(self.opts("param", "default", "agg", "aggregator", "trainer")).await;
        let mut trainers = Vec::new();
        for i in 0..n {
            let opts = self
                .opts("param", "default", &format!("t{i}"), "trainer", "aggregator")
                .with_prop("weight", 100 + i as u64);
            trainers.push(self.open(opts).await);
        }
        agg.await_ends(n, PATIENCE).await.expect("trainers visible");
        for t in &trainers {
            t.await_join(PATIENCE).await.expect("aggregator visible");
        }
        (agg, trainers)
    }
}

/// A fresh CA and a server identity it signed for `names`.
fn test_pki(names: &[&str]) -> (fledge_tls::Ca, fledge_tls::ServerIdentity) {
    let dir = tempfile::tempdir().expect("tempdir");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let generated = fledge_tls::ensure_dir(dir.path(), &names).expect("test CA");
    (generated.ca, generated.identity)
}

/// An embedded broker on a free loopback port serving mqtts with a certificate for `names`,
/// and the CA that signed it.
#[cfg(feature = "broker")]
fn tls_broker(names: &[&str]) -> (fledge_channel::broker::BrokerHandle, fledge_tls::Ca) {
    use fledge_channel::broker::{BrokerOptions, start_embedded_broker_with};
    let (ca, identity) = test_pki(names);
    let options = BrokerOptions {
        tls: Some(identity.server_config(Vec::new()).expect("server config")),
        ..BrokerOptions::default()
    };
    let broker = start_embedded_broker_with((std::net::Ipv4Addr::LOCALHOST, 0).into(), options)
        .expect("TLS broker starts");
    assert!(broker.tls() && broker.url().starts_with("mqtts://"), "{}", broker.url());
    (broker, ca)
}

fn fast_liveness(mut config: MqttConfig) -> MqttConfig {
    config.keep_alive = Duration::from_secs(1);
    config.heartbeat = Duration::from_millis(200);
    config.liveness_timeout = Duration::from_secs(2);
    config
}

/// Every end id the suite uses: the members of a sealed fixture's channels.
fn universe() -> Vec<String> {
    let mut ids: Vec<String> =
        ["agg", "agg-a", "agg-b", "solo", "t-a", "t-b", "t-c", "x"].map(str::to_owned).to_vec();
    for i in 0..16 {
        ids.push(format!("t{i}"));
        ids.push(format!("p{i}"));
    }
    ids
}

fn digest(parts: &[&str]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// End `me`'s keys on `channel` of `job`, as the control plane would derive them.
fn keyring(job: &str, channel: &str, me: &str) -> fledge_channel::Keyring {
    let members = universe()
        .into_iter()
        .filter(|e| e != me)
        .map(|e| {
            let public = fledge_channel::Keyring::public_key_of(&digest(&["id", job, &e]));
            (TaskId::new(e), public)
        })
        .collect::<Vec<_>>();
    fledge_channel::Keyring::new(digest(&["id", job, me]), digest(&["ch", job, channel]), members)
        .expect("valid keys")
}

fn unique_job() -> String {
    format!("job-{:016x}", rand::random::<u64>())
}

fn id(s: &str) -> TaskId {
    TaskId::new(s)
}

fn update(round: u64) -> Message {
    Message::new(Kind::Update, round)
        .with_meta("weight", 10)
        .with_tensor("w", Tensor::from_f32(vec![2], &[round as f32, 1.0]).expect("shape"))
}

/// Polls `check` until it holds (for effects with no event to wait on).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn join_and_ends(f: Fixture) {
    let (agg, trainers) = f.star(2).await;
    assert_eq!(agg.ends(), vec![id("t0"), id("t1")]);
    assert_eq!(trainers[0].ends(), vec![id("agg")]);
    assert_eq!(agg.me(), &id("agg"));
    assert_eq!((agg.name(), agg.group()), ("param", "default"));
    let props = agg.end_props(&id("t1")).expect("t1 announced");
    assert_eq!(props.role, "trainer");
    assert_eq!(props.task_id, id("t1"));
    assert_eq!(props.props.get("weight"), Some(&serde_json::json!(101)));
    assert!(agg.end_props(&id("nobody")).is_none());

    // Clean leave and re-join.
    trainers[1].leave().await.expect("leave");
    agg.await_leave(&id("t1"), PATIENCE).await.expect("t1 gone");
    assert_eq!(agg.ends(), vec![id("t0")]);
    trainers[1].join().await.expect("join");
    agg.await_ends(2, PATIENCE).await.expect("t1 back");

    // A lone end times out waiting for peers.
    let lonely = f.open(f.opts("other", "default", "solo", "aggregator", "trainer")).await;
    assert!(matches!(
        lonely.await_join(Duration::from_millis(300)).await,
        Err(Error::JoinTimeout { .. })
    ));
}

async fn self_loop(f: Fixture) {
    let mut peers = Vec::new();
    for i in 0..3 {
        peers.push(f.open(f.opts("ring", "default", &format!("p{i}"), "peer", "peer")).await);
    }
    for p in &peers {
        p.await_ends(2, PATIENCE).await.expect("both others visible");
        assert!(!p.ends().contains(p.me()), "an end never sees itself");
        assert_eq!(p.ends().len(), 2);
    }
    let to = peers[0].broadcast(update(9)).await.expect("broadcast");
    assert_eq!(to, vec![id("p1"), id("p2")]);
    for p in &peers[1..] {
        let m = p.recv(&id("p0")).await.expect("broadcast arrives");
        assert_eq!((m.round, m.sender.as_str()), (9, "p0"));
    }
    peers[1].send(&id("p2"), update(3)).await.expect("unicast within the role");
    assert_eq!(peers[2].recv(&id("p1")).await.expect("arrives").round, 3);
    // The sender got nothing back from its own broadcast.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(peers[0].peek(&id("p0")).is_none());
}

async fn group_and_job_isolation(f: Fixture) {
    let agg_a = f.open(f.opts("param", "a", "agg-a", "aggregator", "trainer")).await;
    let t_a = f.open(f.opts("param", "a", "t-a", "trainer", "aggregator")).await;
    let t_b = f.open(f.opts("param", "b", "t-b", "trainer", "aggregator")).await;
    let other_job = ChannelOptions::new(unique_job(), "param", "a", "t-x", "trainer", "aggregator");
    let t_x = f.open(other_job).await;
    let other_channel = f.open(f.opts("metrics", "a", "t-c", "trainer", "aggregator")).await;
    let agg_b = f.open(f.opts("param", "b", "agg-b", "aggregator", "trainer")).await;
    agg_a.await_join(PATIENCE).await.expect("t-a visible");
    agg_b.await_join(PATIENCE).await.expect("t-b visible");
    // Give stray announcements time to (wrongly) arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agg_a.ends(), vec![id("t-a")]);
    assert_eq!(agg_b.ends(), vec![id("t-b")]);
    assert!(t_x.ends().is_empty());
    assert!(other_channel.ends().is_empty());
    assert!(matches!(agg_a.send(&id("t-b"), update(1)).await, Err(Error::UnknownEnd { .. })));
    agg_a.broadcast(update(2)).await.expect("broadcast");
    assert_eq!(t_a.recv(&id("agg-a")).await.expect("arrives").round, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(t_b.peek(&id("agg-a")).is_none());
    assert!(t_x.peek(&id("agg-a")).is_none());
}

async fn unicast_order_per_sender(f: Fixture) {
    let (agg, trainers) = f.star(2).await;
    let n = 40;
    let sends = trainers.iter().map(|t| async move {
        for round in 0..n {
            t.send(&id("agg"), update(round)).await.expect("send");
        }
    });
    futures::future::join_all(sends).await;
    for t in ["t0", "t1"] {
        for round in 0..n {
            let m = agg.recv(&id(t)).await.expect("recv");
            assert_eq!((m.round, m.sender.as_str()), (round, t));
            assert_eq!(
                &*m.tensors.get("w").expect("w").as_f32().expect("f32"),
                &[round as f32, 1.0]
            );
        }
    }
    // Unknown peers are refused on send and recv.
    assert!(matches!(agg.send(&id("ghost"), update(0)).await, Err(Error::UnknownEnd { .. })));
    assert!(matches!(agg.recv(&id("ghost")).await, Err(Error::EndLeft { .. })));
    let sent = trainers[0].metrics().snapshot();
    assert_eq!(sent.messages_sent, n);
    assert!(sent.bytes_sent > 0);
    let received = agg.metrics().snapshot();
    assert_eq!(received.messages_received, 2 * n);
    assert!(received.bytes_received >= sent.bytes_sent);
}

async fn broadcast_and_recv_fifo(f: Fixture) {
    let (agg, trainers) = f.star(3).await;
    let to = agg
        .broadcast(Message::new(Kind::Weights, 5).with_meta("lr", 0.1))
        .await
        .expect("broadcast");
    assert_eq!(to, vec![id("t0"), id("t1"), id("t2")]);
    for t in &trainers {
        let m = t.recv(&id("agg")).await.expect("weights");
        assert_eq!((m.kind, m.round, m.sender.as_str()), (Kind::Weights, 5, "agg"));
        assert_eq!(m.meta.get("lr"), Some(&serde_json::json!(0.1)));
    }
    // Arrival order t2, t0, t1: each waits until the previous one is queued.
    for i in [2, 0, 1] {
        trainers[i].send(&id("agg"), update(i as u64)).await.expect("send");
        let from = id(&format!("t{i}"));
        eventually("update queued", || agg.peek(&from).is_some()).await;
    }
    let got: Vec<TaskId> =
        agg.recv_fifo(&agg.ends(), 2).map(|r| r.expect("fifo item").0).collect().await;
    assert_eq!(got, vec![id("t2"), id("t0")]);
    // The one not taken stays queued.
    assert_eq!(agg.recv(&id("t1")).await.expect("left over").round, 1);
    // recv_any takes the oldest across ends.
    trainers[1].send(&id("agg"), update(11)).await.expect("send");
    eventually("queued", || agg.peek(&id("t1")).is_some()).await;
    trainers[0].send(&id("agg"), update(10)).await.expect("send");
    eventually("queued", || agg.peek(&id("t0")).is_some()).await;
    let (from, m) = agg.recv_any().await.expect("any");
    assert_eq!((from, m.round), (id("t1"), 11));
    // A fifo over ends that left yields what is queued, then stops.
    drop(trainers);
    agg.await_leave(&id("t2"), PATIENCE).await.expect("t2 gone");
    let left: Vec<TaskId> = agg
        .recv_fifo(&[id("t0"), id("t1"), id("t2")], 3)
        .map(|r| r.expect("item").0)
        .collect()
        .await;
    assert_eq!(left, vec![id("t0")]);
}

async fn big_message(f: Fixture) {
    let (agg, trainers) = f.star(1).await;
    let n = 16 << 20; // 16 Mi floats = 64 MiB.
    let values: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
    let message = Message::new(Kind::Weights, 1)
        .with_tensor("big", Tensor::from_f32(vec![4096, n / 4096], &values).expect("shape"));
    let start = tokio::time::Instant::now();
    let (t0, agg_id) = (id("t0"), id("agg"));
    let (sent, received) = tokio::join!(agg.send(&t0, message), trainers[0].recv(&agg_id));
    sent.expect("64 MiB sent");
    let m = received.expect("64 MiB received");
    let elapsed = start.elapsed();
    eprintln!(
        "64 MiB transfer: {:.3} s ({:.1} MB/s)",
        elapsed.as_secs_f64(),
        64.0 * 1.048576 / elapsed.as_secs_f64()
    );
    let big = m.tensors.get("big").expect("tensor");
    assert_eq!(big.shape(), &[4096, n / 4096]);
    assert!(big.as_f32().expect("f32") == values.as_slice());
}

async fn concurrent_chunked_senders(mut f: Fixture) {
    // Small chunks so that both senders' chunks interleave at the receiver.
    match &mut f.backend {
        Backend::Mqtt(config) => config.chunk_size = 64 << 10,
        Backend::P2p(config) => config.chunk_size = 64 << 10,
        Backend::Local(_) => {}
    }
    let (agg, trainers) = f.star(2).await;
    let n = 1 << 20; // 4 MiB of f32 each, 64 chunks each.
    let sends = trainers.iter().enumerate().map(|(i, t)| {
        let values: Vec<f32> = (0..n).map(|v| (v + i) as f32).collect();
        let message = Message::new(Kind::Update, i as u64)
            .with_tensor("w", Tensor::from_f32(vec![n], &values).expect("shape"));
        async move { t.send(&id("agg"), message).await }
    });
    for res in futures::future::join_all(sends).await {
        res.expect("send");
    }
    for i in 0..2 {
        let m = agg.recv(&id(&format!("t{i}"))).await.expect("reassembled");
        let w = m.tensors.get("w").expect("w");
        let w = w.as_f32().expect("f32");
        assert_eq!(w.len(), n);
        assert!(w.iter().enumerate().all(|(v, x)| *x == (v + i) as f32));
    }
    assert_eq!(agg.metrics().snapshot().messages_dropped, 0);
}

async fn peer_death(f: Fixture) {
    let (agg, mut trainers) = f.star(2).await;
    // Crash: the handle goes away without leaving.
    let t1 = trainers.pop().expect("t1");
    drop(t1);
    agg.await_leave(&id("t1"), PATIENCE).await.expect("dead peer leaves ends()");
    assert_eq!(agg.ends(), vec![id("t0")]);
    assert!(matches!(agg.recv(&id("t1")).await, Err(Error::EndLeft { .. })));
    if f.is_networked() {
        // Hang: connection open but silent; only the liveness timeout can tell.
        trainers[0].simulate_hang();
        agg.await_leave(&id("t0"), PATIENCE).await.expect("hung peer leaves ends()");
    }
}

/// A worker that crashes and rejoins under the same id between a request and its answer never
/// got the request: a fifo over the old incarnation stops waiting for it (it would otherwise
/// wait forever), and the new incarnation is served from the next request on.
async fn restarted_peer(f: Fixture) {
    let (agg, mut trainers) = f.star(2).await;
    agg.broadcast(Message::new(Kind::Weights, 1)).await.expect("broadcast");
    for t in &trainers {
        t.recv(&id("agg")).await.expect("weights");
    }
    // t1 crashes and comes back at once, before anyone looks.
    drop(trainers.pop().expect("t1"));
    let t1 = f.open(f.opts("param", "default", "t1", "trainer", "aggregator")).await;
    t1.await_join(PATIENCE).await.expect("t1 rejoined");
    trainers[0].send(&id("agg"), update(1)).await.expect("send");
    let answered: Vec<TaskId> = tokio::time::timeout(
        PATIENCE,
        agg.recv_fifo(&[id("t0"), id("t1")], 2).map(|r| r.expect("item").0).collect::<Vec<_>>(),
    )
    .await
    .expect("the fifo does not wait for the restarted end");
    assert_eq!(answered, vec![id("t0")]);
    // The next request reaches the new incarnation, whose answer is waited for.
    agg.await_join(PATIENCE).await.expect("peers");
    eventually("t1 back in ends()", || agg.ends().contains(&id("t1"))).await;
    agg.send(&id("t1"), Message::new(Kind::Weights, 2)).await.expect("send to new t1");
    assert_eq!(t1.recv(&id("agg")).await.expect("weights").round, 2);
    t1.send(&id("agg"), update(2)).await.expect("send");
    let answered: Vec<TaskId> = tokio::time::timeout(
        PATIENCE,
        agg.recv_fifo(&[id("t1")], 1).map(|r| r.expect("item").0).collect::<Vec<_>>(),
    )
    .await
    .expect("the new incarnation answers");
    assert_eq!(answered, vec![id("t1")]);
}

async fn size_limit(f: Fixture) {
    let mut small = f.opts("param", "default", "agg", "aggregator", "trainer");
    small.max_message_bytes = 64 << 10;
    let agg = f.open(small).await;
    let t0 = f.open(f.opts("param", "default", "t0", "trainer", "aggregator")).await;
    agg.await_join(PATIENCE).await.expect("joined");
    t0.await_join(PATIENCE).await.expect("joined");
    let big = || {
        Message::new(Kind::Weights, 1).with_tensor(
            "b",
            Tensor::from_u8(vec![100 << 10], vec![1u8; 100 << 10].into()).expect("shape"),
        )
    };
    // The sender refuses what exceeds its own limit.
    assert!(matches!(agg.send(&id("t0"), big()).await, Err(Error::TooLarge { .. })));
    assert!(matches!(agg.broadcast(big()).await, Err(Error::TooLarge { .. })));
    // The receiver refuses what exceeds its limit: an error locally, a counted drop over a
    // network.
    match t0.send(&id("agg"), big()).await {
        Err(Error::TooLarge { .. }) => assert!(!f.is_networked()),
        Ok(()) => {
            assert!(f.is_networked());
            eventually("oversized message dropped", || {
                agg.metrics().snapshot().messages_dropped == 1
            })
            .await;
        }
        Err(e) => panic!("unexpected error {e}"),
    }
    // Small messages still flow.
    t0.send(&id("agg"), update(1)).await.expect("small send");
    assert_eq!(agg.recv(&id("t0")).await.expect("small arrives").round, 1);
    // Bad options are named.
    let mut bad = f.opts("param", "default", "", "trainer", "aggregator");
    bad.queue_depth = 0;
    let err = Channel::open(bad, f.backend.clone()).await.expect_err("invalid");
    assert!(err.to_string().contains("me is empty"), "{err}");
    assert!(err.to_string().contains("queue_depth is 0"), "{err}");
}

async fn duplicate_and_p2p(f: Fixture) {
    let _a = f.open(f.opts("param", "default", "agg", "aggregator", "trainer")).await;
    if !f.is_networked() {
        // MQTT and p2p cannot tell a duplicate id from a restart; the local hub can.
        let dup = Channel::open(
            f.opts("param", "default", "agg", "aggregator", "trainer"),
            f.backend.clone(),
        )
        .await;
        assert!(matches!(dup, Err(Error::DuplicateEnd { .. })));
    }
    // A p2p end whose metaserver is unreachable fails to open, naming the address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let nowhere = P2pConfig::new(format!("http://127.0.0.1:{port}"));
    let p2p = Channel::open(
        f.opts("param", "default", "x", "trainer", "aggregator"),
        Backend::P2p(nowhere),
    )
    .await;
    match p2p {
        Err(err @ Error::P2p { .. }) => {
            assert!(
                err.to_string().contains(&format!("metaserver http://127.0.0.1:{port}")),
                "{err}"
            );
        }
        other => panic!("expected a p2p connect error, got {other:?}"),
    }
}

macro_rules! backend_test_suite {
    ($module:ident, $fixture:expr) => {
        mod $module {
            use super::*;

            macro_rules! case {
                ($name:ident) => {
                    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
                    async fn $name() {
                        let Some(fixture) = $fixture else { return };
                        super::$name(fixture).await;
                    }
                };
            }

            case!(join_and_ends);
            case!(self_loop);
            case!(group_and_job_isolation);
            case!(unicast_order_per_sender);
            case!(broadcast_and_recv_fifo);
            case!(big_message);
            case!(concurrent_chunked_senders);
            case!(peer_death);
            case!(restarted_peer);
            case!(size_limit);
            case!(duplicate_and_p2p);
        }
    };
}

backend_test_suite!(local, Fixture::local());
backend_test_suite!(p2p, Fixture::p2p());
#[cfg(feature = "broker")]
backend_test_suite!(embedded, Fixture::embedded());
backend_test_suite!(mosquitto, Fixture::mosquitto());
#[cfg(feature = "broker")]
backend_test_suite!(embedded_tls, Fixture::embedded_tls());
#[cfg(feature = "broker")]
backend_test_suite!(embedded_tls_sealed, Fixture::embedded_tls().map(Fixture::sealed));
backend_test_suite!(mosquitto_tls, Fixture::mosquitto_tls());
backend_test_suite!(p2p_sealed, Fixture::p2p().map(Fixture::sealed));
#[cfg(feature = "broker")]
backend_test_suite!(embedded_sealed, Fixture::embedded().map(Fixture::sealed));
backend_test_suite!(mosquitto_sealed, Fixture::mosquitto().map(Fixture::sealed));

/// A quick broker restart in the middle of a round (faster than anyone's liveness timeout):
/// the reconnected aggregator no longer waits for an answer to the model it sent before (the
/// broker lost whatever was in flight), so its round ends instead of hanging, and messages
/// flow again once it sends anew.
async fn quick_restart_mid_round(port: u16, restart: impl FnOnce()) {
    let mut config = MqttConfig::new("127.0.0.1", port);
    config.keep_alive = Duration::from_secs(1);
    config.heartbeat = Duration::from_millis(200);
    config.liveness_timeout = Duration::from_secs(20);
    let f = Fixture {
        backend: Backend::Mqtt(config),
        #[cfg(feature = "broker")]
        _broker: None,
        _metaserver: None,
        job: unique_job(),
        sealed: false,
    };
    let (agg, trainers) = f.star(1).await;
    let t0 = &trainers[0];
    agg.send(&id("t0"), update(1)).await.expect("model sent");
    assert_eq!(t0.recv(&id("agg")).await.expect("model arrives").round, 1);
    assert!(agg.can_answer(&id("t0")));
    restart();
    // Reconnected, the aggregator stops waiting for t0's answer to round 1 ...
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while agg.can_answer(&id("t0")) {
        assert!(tokio::time::Instant::now() < deadline, "the aggregator never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut round = Box::pin(agg.recv_fifo(&[id("t0")], 1));
    let next = tokio::time::timeout(PATIENCE, round.next()).await.expect("the round ends");
    assert!(next.is_none(), "nothing from t0 was queued: {next:?}");
    // ... and the next round works: t0 (reconnected too) answers what it is sent now.
    agg.send(&id("t0"), update(2)).await.expect("model sent again");
    assert!(agg.can_answer(&id("t0")));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no message crossed the restarted broker");
        t0.send(&id("agg"), update(3)).await.expect("send");
        if let Ok(got) = tokio::time::timeout(Duration::from_secs(1), agg.recv(&id("t0"))).await {
            assert_eq!(got.expect("recv").round, 3);
            break;
        }
    }
}

/// The same against a private Mosquitto on a free port, SIGKILLed and started again (skipped,
/// with a message, when no `mosquitto` binary is installed).
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_mosquitto_restart_mid_round_costs_the_round_and_no_more() {
    let bin = ["mosquitto", "/usr/sbin/mosquitto"]
        .into_iter()
        .find(|b| std::process::Command::new(b).arg("-h").output().is_ok());
    let Some(bin) = bin else {
        eprintln!("no mosquitto binary: skipping the Mosquitto restart test");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let start = || {
        let mut child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return child;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("mosquitto did not listen on {port}");
    };
    let mut broker = start();
    let mut restarted = None;
    quick_restart_mid_round(port, || {
        broker.kill().expect("kill -9 mosquitto");
        broker.wait().expect("reaped");
        restarted = Some(start());
    })
    .await;
    if let Some(mut b) = restarted {
        let _ = b.kill();
        let _ = b.wait();
    }
}

#[cfg(feature = "broker")]
mod broker_only {
    use super::*;
    use fledge_channel::broker::start_embedded_broker;

    /// The embedded broker restarted on its address mid-round (see `quick_restart_mid_round`).
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn an_embedded_broker_restart_mid_round_costs_the_round_and_no_more() {
        let broker =
            start_embedded_broker((std::net::Ipv4Addr::LOCALHOST, 0).into()).expect("start");
        let addr = broker.addr();
        let mut restarted = None;
        quick_restart_mid_round(addr.port(), || {
            broker.shutdown();
            restarted = Some(start_embedded_broker(addr).expect("restart on the same address"));
        })
        .await;
        drop(restarted);
    }

    /// Clients reconnect, re-subscribe and re-announce after the broker restarts on its address.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn reconnect_after_broker_restart() {
        let broker =
            start_embedded_broker((std::net::Ipv4Addr::LOCALHOST, 0).into()).expect("start");
        let addr = broker.addr();
        assert_ne!(addr.port(), 0, "port 0 resolves to the bound port");
        let f = Fixture {
            backend: Backend::Mqtt(fast_liveness(MqttConfig::new("127.0.0.1", addr.port()))),
            _broker: None,
            _metaserver: None,
            job: unique_job(),
            sealed: false,
        };
        let (agg, trainers) = f.star(1).await;
        broker.shutdown();
        // Everyone sees everyone go (their liveness view expires while the broker is down).
        agg.await_leave(&id("t0"), PATIENCE).await.expect("t0 unseen while broker is down");
        let broker = start_embedded_broker(addr).expect("restart on the same address");
        agg.await_join(PATIENCE).await.expect("t0 back after restart");
        trainers[0].await_join(PATIENCE).await.expect("agg back after restart");
        trainers[0].send(&id("agg"), update(7)).await.expect("send after restart");
        assert_eq!(agg.recv(&id("t0")).await.expect("recv after restart").round, 7);
        drop(broker);
    }

    /// A broker with `auth` admits only logins the check accepts: an anonymous client or a
    /// wrong password never joins, so it can neither see nor send anything.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn an_authenticating_broker_admits_only_accepted_logins() {
        use fledge_channel::MqttCredentials;
        use fledge_channel::broker::{BrokerAuth, BrokerOptions, start_embedded_broker_with};
        let job = unique_job();
        let admitted = format!("{job}/agg");
        let auth = BrokerAuth::new(move |user: String, pass: String| {
            let ok = user == admitted && pass == "secret";
            async move { ok }
        });
        let options = BrokerOptions { auth: Some(auth), ..BrokerOptions::default() };
        let broker = start_embedded_broker_with((std::net::Ipv4Addr::LOCALHOST, 0).into(), options)
            .expect("start");
        let anonymous = fast_liveness(MqttConfig::new("127.0.0.1", broker.addr().port()));
        let login = |user: &str, pass: &str| MqttConfig {
            credentials: Some(MqttCredentials {
                username: user.to_owned(),
                password: pass.to_owned(),
            }),
            ..anonymous.clone()
        };
        let opts = |me: &str, role: &str, peer: &str| {
            ChannelOptions::new(job.as_str(), "param", "default", me, role, peer)
        };
        let agg = Channel::open(
            opts("agg", "aggregator", "trainer"),
            Backend::Mqtt(login(&format!("{job}/agg"), "secret")),
        )
        .await
        .expect("the accepted login joins");
        for (what, config) in [
            ("anonymous", anonymous.clone()),
            ("wrong password", login(&format!("{job}/agg"), "guess")),
            ("right password, other user", login(&format!("{job}/t0"), "secret")),
        ] {
            // A refused client retries until its connect timeout: keep that short.
            let config = MqttConfig { connect_timeout: Duration::from_secs(2), ..config };
            let refused = Channel::open(opts("t0", "trainer", "aggregator"), Backend::Mqtt(config))
                .await
                .err();
            assert!(refused.is_some(), "{what}: a client without the login joined");
        }
        assert!(agg.ends().is_empty(), "no refused client was ever seen: {:?}", agg.ends());
        drop(agg);
    }

    /// A raw client connecting to `port` with login `user`: its event loop once connected, or
    /// why it was not.
    async fn raw_connect(
        port: u16,
        user: &str,
    ) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), rumqttc::ConnectionError> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
        let mut options =
            MqttOptions::new(format!("raw-{:08x}", rand::random::<u32>()), "127.0.0.1", port);
        options.set_credentials(user, "secret");
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok((client, eventloop)),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// A raw client with login `user` that connects, does `act`, and then reads for up to 5 s:
    /// whether the broker dropped it, and how many publishes it got.
    async fn attempt(
        port: u16,
        user: &str,
        act: impl FnOnce(&rumqttc::AsyncClient),
    ) -> (bool, usize) {
        use rumqttc::{Event, Packet};
        let (client, mut eventloop) =
            raw_connect(port, user).await.unwrap_or_else(|e| panic!("{user}: {e}"));
        act(&client);
        let mut received = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Err(_) => return (false, received),
                Ok(Err(_)) => return (true, received),
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => received += 1,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// On a broker with logins, the relay keeps a login `<job>/<task>` inside its job and its
    /// own presence: a member of one job that subscribes to another job (or to everything),
    /// publishes into it, or publishes another end's presence in its own job is dropped at
    /// once and gets nothing; the other job's channels, through the same relay, carry on.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn logins_stay_inside_their_job_and_their_own_presence() {
        use fledge_channel::MqttCredentials;
        use fledge_channel::broker::{BrokerAuth, BrokerOptions, start_embedded_broker_with};
        use rumqttc::QoS;
        let auth = BrokerAuth::new(|_user: String, pass: String| async move { pass == "secret" });
        let options = BrokerOptions { auth: Some(auth), ..BrokerOptions::default() };
        let broker = start_embedded_broker_with((std::net::Ipv4Addr::LOCALHOST, 0).into(), options)
            .expect("start");
        let port = broker.addr().port();
        let (victim, spy) = (unique_job(), unique_job());
        let login = |user: String| {
            Backend::Mqtt(MqttConfig {
                credentials: Some(MqttCredentials { username: user, password: "secret".into() }),
                ..fast_liveness(MqttConfig::new("127.0.0.1", port))
            })
        };
        let opts = |me: &str, role: &str, peer: &str| {
            ChannelOptions::new(victim.as_str(), "param", "default", me, role, peer)
        };
        let agg =
            Channel::open(opts("agg", "aggregator", "trainer"), login(format!("{victim}/agg")))
                .await
                .expect("the aggregator joins through the relay");
        let trainer =
            Channel::open(opts("t0", "trainer", "aggregator"), login(format!("{victim}/t0")))
                .await
                .expect("the trainer joins through the relay");
        eventually("they see each other", || agg.ends().contains(&id("t0"))).await;
        trainer.send(&id("agg"), update(1)).await.expect("send");
        assert_eq!(agg.recv(&id("t0")).await.expect("arrives").round, 1);

        let spy_login = format!("{spy}/s1");
        let theirs = format!("fledge/{victim}/param/default");
        let mine = format!("fledge/{spy}/param/default");
        type Act = Box<dyn FnOnce(&rumqttc::AsyncClient)>;
        let attacks: Vec<(&str, Act)> = vec![
            ("subscribe to the other job", {
                let filter = format!("fledge/{victim}/#");
                Box::new(move |c| c.try_subscribe(filter, QoS::AtLeastOnce).expect("queued"))
            }),
            (
                "subscribe to everything",
                Box::new(|c| c.try_subscribe("#", QoS::AtLeastOnce).expect("queued")),
            ),
            ("publish into the other job", {
                let topic = format!("{theirs}/data/agg");
                Box::new(move |c| {
                    c.try_publish(topic, QoS::AtLeastOnce, false, vec![1u8; 64]).expect("queued")
                })
            }),
            ("evict the other job's trainer", {
                let topic = format!("{theirs}/presence/trainer/t0");
                Box::new(move |c| {
                    c.try_publish(topic, QoS::AtLeastOnce, true, Vec::new()).expect("queued")
                })
            }),
            ("publish another end's presence in its own job", {
                let topic = format!("{mine}/presence/trainer/someone-else");
                Box::new(move |c| {
                    c.try_publish(topic, QoS::AtLeastOnce, true, b"{}".to_vec()).expect("queued")
                })
            }),
        ];
        for (what, act) in attacks {
            let (dropped, received) = attempt(port, &spy_login, act).await;
            assert!(dropped, "{what}: the client was not disconnected");
            assert_eq!(received, 0, "{what}: the client got messages");
        }
        // Inside its own job it may subscribe and stays connected.
        let (dropped, _) = attempt(port, &spy_login, {
            let filter = format!("fledge/{spy}/#");
            move |c| c.try_subscribe(filter, QoS::AtLeastOnce).expect("queued")
        })
        .await;
        assert!(!dropped, "a subscription inside its own job was refused");
        // rumqttd's own port, behind the relay, takes no login, not even a valid one: the rules
        // cannot be bypassed from the broker's machine.
        let internal = broker.internal_addr().port();
        let bypass = raw_connect(internal, &spy_login).await;
        assert!(bypass.is_err(), "a valid login connected past the relay");
        // The victim job never noticed.
        assert!(agg.ends().contains(&id("t0")), "the trainer was evicted: {:?}", agg.ends());
        trainer.send(&id("agg"), update(2)).await.expect("send");
        assert_eq!(agg.recv(&id("t0")).await.expect("arrives").round, 2);
        assert!(agg.peek(&id("t0")).is_none(), "nothing else reached the aggregator");
    }

    #[test]
    fn busy_address_is_an_error() {
        let broker =
            start_embedded_broker((std::net::Ipv4Addr::LOCALHOST, 0).into()).expect("start");
        let err = start_embedded_broker(broker.addr()).expect_err("address in use");
        assert!(err.to_string().contains("bind broker address"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bench_helpers_run() {
        let d = fledge_channel::bench::mqtt_fanout(1 << 20, 3).await.expect("fanout");
        assert!(d > Duration::ZERO);
        for secure in [true, false] {
            let d = fledge_channel::bench::mqtt_round(1 << 20, 2, secure).await.expect("round");
            assert!(d > Duration::ZERO);
        }
        let gbps = fledge_channel::bench::loopback_tcp_bandwidth(64 << 20).await.expect("loopback");
        assert!(gbps > 0.0);
        let local = fledge_channel::bench::fanout(Backend::Local(LocalHub::new()), 1 << 20, 3)
            .await
            .expect("local fanout");
        assert!(local > Duration::ZERO);
    }
}

/// mqtts: only a client that verifies the broker (its CA, its name) gets in; everything else
/// fails, the TLS refusals at once and naming the broker.
#[cfg(feature = "broker")]
mod tls_only {
    use super::*;
    use fledge_channel::MqttTls;

    fn opts(job: &str, me: &str, role: &str, peer: &str) -> ChannelOptions {
        ChannelOptions::new(job, "param", "default", me, role, peer)
    }

    /// A refused client would retry until its connect timeout: keep that short.
    fn quick(config: MqttConfig) -> MqttConfig {
        MqttConfig { connect_timeout: Duration::from_secs(2), ..fast_liveness(config) }
    }

    async fn open_err(job: &str, config: MqttConfig) -> Error {
        match Channel::open(opts(job, "t0", "trainer", "aggregator"), Backend::Mqtt(config)).await {
            Ok(_) => panic!("the client must not join"),
            Err(err) => err,
        }
    }

    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn the_broker_counts_the_connections_open_past_the_handshake() {
        use std::sync::atomic::Ordering;
        let (broker, ca) = tls_broker(&["127.0.0.1"]);
        let open = broker.connections();
        // A connection that never completes its handshake is not a client yet.
        let silent = tokio::net::TcpStream::connect(broker.addr()).await.expect("tcp connect");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(open.load(Ordering::Relaxed), 0);
        let mut config = MqttConfig::parse(&broker.url()).expect("url");
        config.tls = Some(MqttTls { ca: Some(ca) });
        let job = unique_job();
        let a = Channel::open(
            opts(&job, "a", "aggregator", "trainer"),
            Backend::Mqtt(fast_liveness(config.clone())),
        )
        .await
        .expect("joins");
        let b = Channel::open(
            opts(&job, "b", "trainer", "aggregator"),
            Backend::Mqtt(fast_liveness(config)),
        )
        .await
        .expect("joins");
        eventually("two open connections", || open.load(Ordering::Relaxed) == 2).await;
        drop(silent);
        a.close().await.expect("close");
        eventually("one open connection", || open.load(Ordering::Relaxed) == 1).await;
        b.close().await.expect("close");
        eventually("no open connection", || open.load(Ordering::Relaxed) == 0).await;
    }

    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn a_tls_broker_admits_only_clients_that_verify_it() {
        let (broker, ca) = tls_broker(&["127.0.0.1"]);
        let url = broker.url();
        let trusting = {
            let mut config = MqttConfig::parse(&url).expect("url");
            config.tls = Some(MqttTls { ca: Some(ca.clone()) });
            fast_liveness(config)
        };
        let job = unique_job();

        // A client that opens a connection and never says anything holds up nobody.
        let silent = tokio::net::TcpStream::connect(broker.addr()).await.expect("tcp connect");

        let agg = Channel::open(
            opts(&job, "agg", "aggregator", "trainer"),
            Backend::Mqtt(trusting.clone()),
        )
        .await
        .expect("a client trusting the broker's CA joins");
        let trainer =
            Channel::open(opts(&job, "t1", "trainer", "aggregator"), Backend::Mqtt(trusting))
                .await
                .expect("a second one too");
        agg.await_ends(1, PATIENCE).await.expect("the trainer is seen");
        trainer.await_join(PATIENCE).await.expect("the aggregator is seen");
        trainer.send(&id("agg"), update(3)).await.expect("send over mqtts");
        assert_eq!(agg.recv(&id("t1")).await.expect("recv over mqtts").round, 3);

        // Trusting another CA: refused by TLS at once (not after the timeout), naming the
        // broker and the certificate.
        let (stranger, _) = test_pki(&["127.0.0.1"]);
        let mut config = MqttConfig::parse(&url).expect("url");
        config.tls = Some(MqttTls { ca: Some(stranger) });
        match open_err(&job, quick(config)).await {
            Error::BrokerTls { broker, reason } => {
                assert_eq!(broker, url);
                assert!(reason.contains("invalid peer certificate"), "{reason}");
            }
            other => panic!("expected a TLS refusal, got {other}"),
        }

        // No CA given: the system's roots, which do not include this private CA.
        let config = MqttConfig::parse(&url).expect("url");
        let err = open_err(&job, quick(config)).await;
        assert!(
            matches!(&err, Error::BrokerTls { reason, .. }
                if reason.contains("invalid peer certificate")),
            "{err}"
        );

        // Plain MQTT to the TLS port: never admitted.
        let plain = MqttConfig::new("127.0.0.1", broker.addr().port());
        let err = open_err(&job, quick(plain)).await;
        assert!(matches!(err, Error::Connect { .. }), "{err}");

        assert_eq!(agg.ends(), vec![id("t1")], "no refused client was ever seen");
        drop(silent);
    }

    /// The broker's certificate chains to the trusted CA but names another host: refused.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn a_certificate_for_another_name_is_refused() {
        let (broker, ca) = tls_broker(&["broker.example"]);
        let mut config = MqttConfig::parse(&broker.url()).expect("url");
        config.tls = Some(MqttTls { ca: Some(ca) });
        match open_err(&unique_job(), quick(config)).await {
            Error::BrokerTls { broker: named, reason } => {
                assert_eq!(named, broker.url());
                assert!(reason.contains("not valid for name"), "{reason}");
            }
            other => panic!("expected a TLS refusal, got {other}"),
        }
    }

    /// An mqtts client pointed at a plain broker does not fall back to plain MQTT.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn a_tls_client_does_not_talk_to_a_plain_broker() {
        let broker = fledge_channel::broker::start_embedded_broker(
            (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        )
        .expect("plain broker");
        let (ca, _) = test_pki(&["127.0.0.1"]);
        let mut config = MqttConfig::parse(&format!("mqtts://{}", broker.addr())).expect("url");
        config.tls = Some(MqttTls { ca: Some(ca) });
        let job = unique_job();
        let watcher = Channel::open(
            opts(&job, "agg", "aggregator", "trainer"),
            Backend::Mqtt(fast_liveness(MqttConfig::new("127.0.0.1", broker.addr().port()))),
        )
        .await
        .expect("a plain client joins the plain broker");
        let err = open_err(&job, quick(config)).await;
        assert!(matches!(err, Error::BrokerTls { .. } | Error::Connect { .. }), "{err}");
        assert!(watcher.ends().is_empty(), "the TLS client joined in plain: {:?}", watcher.ends());
    }
}

mod p2p_only {
    use fledge_proto::v1::{Frame, Hello, PeersRequest, frame::Body};
    use fledge_proto::{MetaserverClient, P2pClient};

    use super::*;

    /// A client of `peer`'s p2p server that trusts the CA `ca` for the ends' certificate name.
    async fn client_trusting(
        peer: &fledge_proto::v1::Peer,
        ca: &str,
    ) -> Result<P2pClient<tonic::transport::Channel>, tonic::transport::Error> {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(fledge_channel::p2p::P2P_SERVER_NAME);
        let endpoint =
            tonic::transport::Endpoint::from_shared(peer.endpoint.clone())?.tls_config(tls)?;
        Ok(P2pClient::new(endpoint.connect().await?))
    }

    /// The ends of role `role` on channel `param` of `f`'s job, as the metaserver lists them.
    async fn listed(f: &Fixture, role: &str) -> Vec<fledge_proto::v1::Peer> {
        let Backend::P2p(config) = &f.backend else { unreachable!("a p2p fixture") };
        let mut meta = MetaserverClient::connect(config.metaserver.clone()).await.expect("meta");
        let request = PeersRequest {
            job_id: f.job.clone(),
            channel: "param".to_owned(),
            group: "default".to_owned(),
            role: role.to_owned(),
        };
        meta.peers(request).await.expect("peers").into_inner().peers
    }

    /// Streams are TLS by default, and a sender reaches an end only through the CA that end
    /// registered: a plain-text client gets no stream, a client trusting another CA (as a
    /// man in the middle's would be) fails the handshake, and the registered CA works.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn streams_are_tls_and_trust_only_the_registered_ca() {
        let f = Fixture::p2p().expect("p2p fixture");
        let (agg, trainers) = f.star(1).await;
        let listed = listed(&f, "aggregator").await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        let peer = &listed[0];
        assert!(peer.endpoint.starts_with("https://"), "{peer:?}");
        fledge_tls::Ca::from_pem(&peer.tls_ca, "registered CA").expect("a CA certificate");

        // Plain text: the HTTP/2 handshake never completes against a TLS listener.
        let plain = peer.endpoint.replacen("https://", "http://", 1);
        let attempt = tonic::transport::Endpoint::from_shared(plain)
            .expect("url")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        match attempt.connect().await {
            Err(_) => {}
            Ok(channel) => {
                let hello = Frame { body: Some(Body::Hello(Hello::default())) };
                let res = P2pClient::new(channel).deliver(futures::stream::iter([hello])).await;
                assert!(res.is_err(), "a plain-text stream was answered: {res:?}");
            }
        }
        // Another CA, for the same name: refused by the certificate check.
        let (stranger, _) = fledge_tls::ephemeral(fledge_channel::p2p::P2P_SERVER_NAME).unwrap();
        let err = client_trusting(peer, stranger.pem()).await.expect_err("refused");
        let chain = format!("{err:?}");
        assert!(chain.contains("InvalidCertificate"), "{chain}");
        // The registered CA: the stream is up (and refused only for its made-up hello).
        let mut client = client_trusting(peer, &peer.tls_ca).await.expect("TLS connects");
        let hello = Frame { body: Some(Body::Hello(Hello::default())) };
        let status = client.deliver(futures::stream::iter([hello])).await.expect_err("forged");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert_eq!(agg.metrics().snapshot().messages_received, 0);
        trainers[0].send(&id("agg"), update(1)).await.expect("send over TLS");
        assert_eq!(agg.recv(&id("t0")).await.expect("arrives").round, 1);
    }

    /// An end with TLS (the default) never sends in plain text, even to a member that
    /// registered a plain endpoint (a platform run with `--insecure` turns TLS off for every
    /// end); an end without TLS may still send to a TLS end.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn a_tls_end_never_sends_in_plain_text() {
        let f = Fixture::p2p().expect("p2p fixture");
        let Backend::P2p(config) = &f.backend else { unreachable!("a p2p fixture") };
        let mut plain = config.clone();
        plain.tls = false;
        let agg = Channel::open(
            f.opts("param", "default", "agg", "aggregator", "trainer"),
            Backend::P2p(plain),
        )
        .await
        .expect("a plain-text end opens");
        let trainer = f.open(f.opts("param", "default", "t0", "trainer", "aggregator")).await;
        eventually("they see each other", || {
            trainer.ends().contains(&id("agg")) && agg.ends().contains(&id("t0"))
        })
        .await;
        assert!(listed(&f, "aggregator").await[0].endpoint.starts_with("http://"));
        let err = trainer.send(&id("agg"), update(1)).await.expect_err("no plain text");
        assert!(err.to_string().contains("plain-text endpoint"), "{err}");
        agg.send(&id("t0"), update(2)).await.expect("plain end to TLS end");
        assert_eq!(trainer.recv(&id("agg")).await.expect("arrives").round, 2);
        assert!(agg.peek(&id("t0")).is_none(), "nothing went out in plain text");
    }

    /// A stream into an end is refused unless its hello names that end's job, channel, group
    /// and id and comes from a registered peer: nothing of a refused stream is queued.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn forged_streams_are_refused() {
        let f = Fixture::p2p().expect("p2p fixture");
        let (agg, trainers) = f.star(1).await;
        let listed = listed(&f, "aggregator").await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        let mut client = client_trusting(&listed[0], &listed[0].tls_ca).await.expect("connects");
        let hello = |job: &str, group: &str, from: &str, to: &str| Hello {
            job_id: job.to_owned(),
            channel: "param".to_owned(),
            group: group.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            ..Hello::default()
        };
        let job = f.job.as_str();
        for (forged, why) in [
            (hello("another-job", "default", "t0", "agg"), "another job"),
            (hello(job, "other-group", "t0", "agg"), "another group"),
            (hello(job, "default", "intruder", "agg"), "not a registered trainer"),
            (hello(job, "default", "agg", "agg"), "not of the peer role"),
            (hello(job, "default", "t0", "someone-else"), "for another end"),
        ] {
            let frames = vec![
                Frame { body: Some(Body::Hello(forged)) },
                Frame { body: Some(Body::Chunk(bytes::Bytes::from_static(b"FLDC"))) },
            ];
            let status = client.deliver(futures::stream::iter(frames)).await.expect_err(why);
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{why}: {status:?}");
        }
        let no_hello = vec![Frame { body: Some(Body::Chunk(bytes::Bytes::from_static(b"x"))) }];
        let status = client.deliver(futures::stream::iter(no_hello)).await.expect_err("no hello");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(agg.peek(&id("t0")).is_none());
        assert_eq!(agg.metrics().snapshot().messages_received, 0);
        // The real peer still gets through.
        trainers[0].send(&id("agg"), update(4)).await.expect("send");
        assert_eq!(agg.recv(&id("t0")).await.expect("arrives").round, 4);
    }

    /// On a channel with keys, a stream is admitted only from an end that proves it is the
    /// end its hello names: an unsigned hello, or one signed by another key, is refused and
    /// counted, even with a scope that is right in every other way.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn a_hello_that_proves_nothing_is_refused() {
        let f = Fixture::p2p().expect("p2p fixture").sealed();
        let (agg, trainers) = f.star(1).await;
        let listed = listed(&f, "aggregator").await;
        let mut client = client_trusting(&listed[0], &listed[0].tls_ca).await.expect("connects");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64;
        let hello = |signature: Vec<u8>| Hello {
            job_id: f.job.clone(),
            channel: "param".to_owned(),
            group: "default".to_owned(),
            from: "t0".to_owned(),
            to: "agg".to_owned(),
            timestamp_ms: now,
            nonce: rand::random::<[u8; 16]>().to_vec(),
            signature,
        };
        for (forged, why) in [
            (hello(Vec::new()), "unsigned"),
            (hello(vec![7u8; 64]), "a made-up signature"),
            (hello(rand::random::<[u8; 32]>().repeat(2)), "random bytes"),
        ] {
            let frames = vec![Frame { body: Some(Body::Hello(forged)) }];
            let status = client.deliver(futures::stream::iter(frames)).await.expect_err(why);
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{why}: {status:?}");
        }
        assert_eq!(agg.metrics().snapshot().rejected_forged, 3);
        assert!(agg.peek(&id("t0")).is_none());
        trainers[0].send(&id("agg"), update(4)).await.expect("send");
        assert_eq!(agg.recv(&id("t0")).await.expect("arrives").round, 4);
    }
}

/// Attacks on a channel with keys over a real broker, through a client that is connected to
/// it but is not a member: it can read and publish anything, retained or not.
mod sealed_attacks {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
    use tokio::sync::mpsc;

    use super::*;

    /// A raw MQTT client subscribed to `filter`, with everything it received.
    struct Spy {
        client: AsyncClient,
        rx: mpsc::UnboundedReceiver<Publish>,
        seen: Vec<Publish>,
    }

    impl Spy {
        async fn connect(f: &Fixture, filter: &str) -> Spy {
            let Backend::Mqtt(config) = &f.backend else { unreachable!("an mqtt fixture") };
            let mut options = MqttOptions::new(
                format!("spy-{:08x}", rand::random::<u32>()),
                config.host.clone(),
                config.port,
            );
            options.set_max_packet_size(64 << 20, 64 << 20);
            let (client, mut eventloop) = AsyncClient::new(options, 64);
            let (tx, rx) = mpsc::unbounded_channel();
            let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
            let mut subscribed_tx = Some(subscribed_tx);
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            if tx.send(p).is_err() {
                                break;
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(s) = subscribed_tx.take() {
                                let _ = s.send(());
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            });
            client.subscribe(filter, QoS::AtLeastOnce).await.expect("subscribe");
            tokio::time::timeout(PATIENCE, subscribed).await.expect("suback").expect("suback");
            Spy { client, rx, seen: Vec::new() }
        }

        /// Waits until `n` publishes on topics ending with `suffix` were received.
        async fn wait_for(&mut self, suffix: &str, n: usize) -> Vec<Publish> {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                let matching: Vec<Publish> =
                    self.seen.iter().filter(|p| p.topic.ends_with(suffix)).cloned().collect();
                if matching.len() >= n {
                    return matching;
                }
                let next = tokio::time::timeout_at(deadline, self.rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("timed out waiting for {n} publishes on *{suffix}"))
                    .expect("spy connected");
                self.seen.push(next);
            }
        }

        async fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) {
            self.client.publish(topic, QoS::AtLeastOnce, retain, payload).await.expect("publish");
        }
    }

    fn topic(f: &Fixture, rest: &str) -> String {
        format!("fledge/{}/param/default/{rest}", f.job)
    }

    /// A complete plain (unsealed) message in the chunk layout, claiming `sender`.
    fn plain_chunk(sender: &str, message: &Message) -> Vec<u8> {
        let mut m = message.clone();
        m.sender = sender.to_owned();
        let encoded = fledge_channel::wire::encode(&m).expect("encode");
        let mut v = b"FLDC\x01".to_vec();
        v.extend_from_slice(&(sender.len() as u16).to_le_bytes());
        v.extend_from_slice(sender.as_bytes());
        v.extend_from_slice(&7u64.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&(encoded.len() as u64).to_le_bytes());
        v.extend_from_slice(&encoded);
        v
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Everything a job sends through the broker is unreadable to a client that is not a
    /// member: no tensor byte, no metadata, not even the wire header shows.
    async fn a_non_member_reading_the_broker_learns_nothing(f: Fixture) {
        let mut spy = Spy::connect(&f, &format!("fledge/{}/#", f.job)).await;
        let (agg, trainers) = f.star(1).await;
        let values: Vec<f32> = (0..4096).map(|i| 0.123_456 * i as f32).collect();
        let secret = || {
            Message::new(Kind::Weights, 3)
                .with_meta("note", "s3cr3t-meta")
                .with_tensor("w", Tensor::from_f32(vec![4096], &values).expect("shape"))
        };
        agg.broadcast(secret()).await.expect("broadcast");
        trainers[0].send(&id("agg"), secret()).await.expect("send");
        assert_eq!(trainers[0].recv(&id("agg")).await.expect("weights").round, 3);
        let update = agg.recv(&id("t0")).await.expect("update");
        assert_eq!(&*update.tensors.get("w").expect("w").as_f32().expect("f32"), &values[..]);
        let mut payloads = spy.wait_for("/data/agg", 1).await;
        payloads.extend(spy.wait_for("/bcast/trainer", 1).await);
        let pattern: Vec<u8> = values[1..17].iter().flat_map(|v| v.to_le_bytes()).collect();
        for p in &payloads {
            assert!(!contains(&p.payload, &pattern), "tensor bytes in clear on {}", p.topic);
            assert!(!contains(&p.payload, b"s3cr3t-meta"), "metadata in clear on {}", p.topic);
            assert!(!contains(&p.payload, b"FLDG"), "wire header in clear on {}", p.topic);
        }
    }

    /// An update that claims another trainer's id is dropped before it is queued, and counted:
    /// from a member that signs with its own key, and from an outsider without keys.
    async fn forged_updates_are_dropped_and_counted(f: Fixture) {
        let (agg, trainers) = f.star(1).await;
        // An insider that knows the channel key and every public key, but not t0's seed: it
        // joins as t0 with its own key (t1's). It heartbeats rarely, so that what it sends is
        // counted exactly: its presence, its update and its leave.
        let mut stolen = f.opts("param", "default", "t0", "trainer", "aggregator");
        stolen.security = Some(std::sync::Arc::new(keyring(&f.job, "param", "t1")));
        let Backend::Mqtt(mut quiet) = f.backend.clone() else { unreachable!("an mqtt fixture") };
        quiet.heartbeat = Duration::from_secs(3600);
        quiet.liveness_timeout = Duration::from_secs(7200);
        let forger = Channel::open(stolen, Backend::Mqtt(quiet)).await.expect("forger opens");
        forger.await_join(PATIENCE).await.expect("the forger sees the aggregator");
        let forged = || {
            Message::new(Kind::Update, 1)
                .with_meta("weight", 1_000_000)
                .with_tensor("w", Tensor::from_f32(vec![2], &[666.0, 666.0]).expect("shape"))
        };
        forger.send(&id("agg"), forged()).await.expect("the forger publishes");
        forger.close().await.expect("the forger leaves");
        // An outsider publishes a complete, well-formed plain message claiming t0.
        let spy = Spy::connect(&f, &topic(&f, "nothing")).await;
        spy.publish(topic(&f, "data/agg"), false, plain_chunk("t0", &forged())).await;
        eventually("every forgery counted", || agg.metrics().snapshot().rejected_forged >= 4).await;
        assert!(agg.peek(&id("t0")).is_none(), "nothing forged was queued");
        trainers[0].send(&id("agg"), update(1)).await.expect("the real t0 sends");
        let m = agg.recv(&id("t0")).await.expect("the real update");
        assert_eq!(m.round, 1);
        assert_eq!(m.meta.get("weight"), Some(&serde_json::json!(10)));
        assert_eq!(agg.metrics().snapshot().messages_received, 1);
    }

    /// A message captured on the broker and published again (a round later) is dropped and
    /// counted; the sender's next message still arrives.
    async fn replayed_messages_are_dropped(f: Fixture) {
        let mut spy = Spy::connect(&f, &topic(&f, "data/agg")).await;
        let (agg, trainers) = f.star(1).await;
        trainers[0].send(&id("agg"), update(1)).await.expect("send");
        assert_eq!(agg.recv(&id("t0")).await.expect("round 1").round, 1);
        let captured = spy.wait_for("/data/agg", 1).await;
        for p in &captured {
            spy.publish(p.topic.clone(), false, p.payload.to_vec()).await;
        }
        eventually("replay counted", || agg.metrics().snapshot().rejected_replayed >= 1).await;
        trainers[0].send(&id("agg"), update(2)).await.expect("send");
        assert_eq!(agg.recv(&id("t0")).await.expect("round 2").round, 2);
        assert!(agg.peek(&id("t0")).is_none(), "round 1 was not queued again");
        assert_eq!(agg.metrics().snapshot().messages_received, 2);
    }

    /// Retained presences from outside the job change nothing: a sybil trainer is not added, an
    /// empty presence does not evict the real one, and a captured presence replayed is refused.
    async fn sybil_and_evicting_presences_change_nothing(f: Fixture) {
        let mut spy = Spy::connect(&f, &topic(&f, "presence/trainer/+")).await;
        let (agg, _trainers) = f.star(1).await;
        let before = agg.end_props(&id("t0")).expect("t0 present");
        // Two of t0's presences (it renews it every heartbeat): the first is then older than the
        // newest the aggregator accepted (the broker delivers in order), so replaying it is a
        // replay; the newest seen again is a retained copy, which is not counted.
        let captured = spy.wait_for("/presence/trainer/t0", 2).await;
        let sybil = serde_json::json!({"role": "trainer", "task_id": "sybil", "props": {}});
        spy.publish(topic(&f, "presence/trainer/sybil"), true, sybil.to_string().into_bytes())
            .await;
        spy.publish(topic(&f, "presence/trainer/t0"), true, Vec::new()).await;
        spy.publish(topic(&f, "presence/trainer/t0"), true, captured[0].payload.to_vec()).await;
        eventually("forgeries counted", || agg.metrics().snapshot().rejected_forged >= 2).await;
        eventually("replay counted", || agg.metrics().snapshot().rejected_replayed >= 1).await;
        assert_eq!(agg.ends(), vec![id("t0")]);
        assert_eq!(agg.end_props(&id("t0")), Some(before), "t0 never left nor restarted");
    }

    macro_rules! attacks {
        ($module:ident, $fixture:expr) => {
            mod $module {
                use super::*;

                macro_rules! case {
                    ($name:ident) => {
                        #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
                        async fn $name() {
                            let Some(fixture) = $fixture else { return };
                            super::$name(fixture.sealed()).await;
                        }
                    };
                }

                case!(a_non_member_reading_the_broker_learns_nothing);
                case!(forged_updates_are_dropped_and_counted);
                case!(replayed_messages_are_dropped);
                case!(sybil_and_evicting_presences_change_nothing);
            }
        };
    }

    #[cfg(feature = "broker")]
    attacks!(embedded, Fixture::embedded());
    attacks!(mosquitto, Fixture::mosquitto());
}
