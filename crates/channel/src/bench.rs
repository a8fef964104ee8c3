//! Transfer measurements for `fledge bench transfer`: a message through channels, and the
//! loopback TCP bandwidth that bounds it.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::channel::{Backend, Channel, ChannelOptions, Error, Result};
use crate::wire::{Kind, Message, Tensor};

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context: context.to_owned(), source }
}

/// A `Weights` message with one `U8` tensor of `bytes` bytes.
pub fn payload_message(bytes: usize) -> Message {
    let data: Bytes = (0..bytes).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
    let tensor = Tensor::from_u8(vec![bytes], data).expect("shape [n] fits n bytes");
    Message::new(Kind::Weights, 1).with_tensor("payload", tensor)
}

/// Time for one sender to broadcast a `bytes`-byte message to `n_receivers` ends over
/// `backend`, until every receiver has decoded it (connection setup excluded).
pub async fn fanout(backend: Backend, bytes: usize, n_receivers: usize) -> Result<Duration> {
    fanout_with(backend, bytes, n_receivers, false).await
}

/// [`fanout`], with every end holding keys when `sealed` (messages encrypted and signed).
pub async fn fanout_with(
    backend: Backend,
    bytes: usize,
    n_receivers: usize,
    sealed: bool,
) -> Result<Duration> {
    let (sender, receivers) = open_star(backend, bytes, n_receivers, sealed).await?;
    let message = payload_message(bytes);
    let from = sender.me().clone();
    let start = Instant::now();
    let waits = receivers.iter().map(|r| {
        let from = from.clone();
        async move { r.recv(&from).await }
    });
    let (sent, received) =
        tokio::join!(sender.broadcast(message), futures::future::join_all(waits));
    sent?;
    for r in received {
        let m = r?;
        debug_assert_eq!(m.tensors.data_bytes(), bytes);
    }
    let elapsed = start.elapsed();
    close_star(sender, receivers).await?;
    Ok(elapsed)
}

/// Time for one FL round's traffic over `backend`: a sender (the aggregator) broadcasts a
/// `bytes`-byte model to `n_receivers` ends (the trainers), each sends back an update of the
/// same size, until the sender has decoded every update (connection setup excluded). With
/// `sealed`, every end holds keys (messages encrypted and signed).
pub async fn round_with(
    backend: Backend,
    bytes: usize,
    n_receivers: usize,
    sealed: bool,
) -> Result<Duration> {
    let (sender, receivers) = open_star(backend, bytes, n_receivers, sealed).await?;
    let model = payload_message(bytes);
    let from = sender.me().clone();
    let start = Instant::now();
    let trainers = receivers.iter().map(|r| {
        let from = from.clone();
        async move {
            let mut update = r.recv(&from).await?;
            update.kind = Kind::Update;
            r.send(&from, update).await
        }
    });
    let updates = receivers.iter().map(|r| sender.recv(r.me()));
    let (sent, replied, received) = tokio::join!(
        sender.broadcast(model),
        futures::future::join_all(trainers),
        futures::future::join_all(updates)
    );
    sent?;
    replied.into_iter().collect::<Result<Vec<()>>>()?;
    for m in received {
        let m = m?;
        debug_assert_eq!((m.kind, m.tensors.data_bytes()), (Kind::Update, bytes));
    }
    let elapsed = start.elapsed();
    close_star(sender, receivers).await?;
    Ok(elapsed)
}

/// A sender (role `aggregator`) and `n_receivers` ends (role `trainer`) of one fresh job,
/// joined, each accepting messages of `bytes` bytes and, when `sealed`, holding keys.
async fn open_star(
    backend: Backend,
    bytes: usize,
    n_receivers: usize,
    sealed: bool,
) -> Result<(Channel, Vec<Channel>)> {
    let job = format!("bench-{:08x}", rand::random::<u32>());
    let limit = bytes + (1 << 20);
    let names: Vec<String> = std::iter::once("sender".to_owned())
        .chain((0..n_receivers).map(|i| format!("receiver-{i}")))
        .collect();
    let seeds: std::collections::HashMap<String, [u8; 32]> =
        names.iter().map(|n| (n.clone(), rand::random())).collect();
    let channel_key: [u8; 32] = rand::random();
    let opts = |me: String, role: &str, peer: &str| -> Result<ChannelOptions> {
        let mut o = ChannelOptions::new(job.as_str(), "bench", "default", me.as_str(), role, peer);
        o.max_message_bytes = limit;
        if sealed {
            let members = seeds
                .iter()
                .filter(|(n, _)| **n != me)
                .map(|(n, seed)| (n.as_str().into(), crate::secure::Keyring::public_key_of(seed)));
            let keys = crate::secure::Keyring::new(seeds[&me], channel_key, members)?;
            o = o.with_security(keys);
        }
        Ok(o)
    };
    let sender =
        Channel::open(opts("sender".into(), "aggregator", "trainer")?, backend.clone()).await?;
    let mut receivers = Vec::with_capacity(n_receivers);
    for i in 0..n_receivers {
        receivers.push(
            Channel::open(opts(format!("receiver-{i}"), "trainer", "aggregator")?, backend.clone())
                .await?,
        );
    }
    sender.await_ends(n_receivers, Duration::from_secs(30)).await?;
    for r in &receivers {
        r.await_join(Duration::from_secs(30)).await?;
    }
    Ok((sender, receivers))
}

async fn close_star(sender: Channel, receivers: Vec<Channel>) -> Result<()> {
    for r in &receivers {
        r.close().await?;
    }
    sender.close().await
}

/// [`round_with`] over a fresh embedded broker: with `secure`, the broker serves mqtts (a
/// one-off CA and certificate for 127.0.0.1, which the ends trust) and every end holds keys;
/// without, plain MQTT and no keys (what `--insecure` would leave if keys were off too).
#[cfg(feature = "broker")]
pub async fn mqtt_round(bytes: usize, n_receivers: usize, secure: bool) -> Result<Duration> {
    let mut options = crate::broker::BrokerOptions::default();
    let mut config = crate::mqtt::MqttConfig::new("127.0.0.1", 0);
    if secure {
        let (ca, identity) = fledge_tls::ephemeral("127.0.0.1")
            .map_err(|e| Error::InvalidOptions(format!("bench TLS identity: {e}")))?;
        options.tls = Some(
            identity
                .server_config(Vec::new())
                .map_err(|e| Error::InvalidOptions(format!("bench TLS identity: {e}")))?,
        );
        config.tls = Some(crate::mqtt::MqttTls { ca: Some(ca) });
    }
    let broker = crate::broker::start_embedded_broker_with(
        (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        options,
    )?;
    config.port = broker.addr().port();
    let res = round_with(Backend::Mqtt(config), bytes, n_receivers, secure).await;
    drop(broker);
    res
}

/// [`fanout`] over a fresh embedded broker.
#[cfg(feature = "broker")]
pub async fn mqtt_fanout(bytes: usize, n_receivers: usize) -> Result<Duration> {
    mqtt_fanout_with(bytes, n_receivers, false).await
}

/// [`fanout_with`] over a fresh embedded broker.
#[cfg(feature = "broker")]
pub async fn mqtt_fanout_with(bytes: usize, n_receivers: usize, sealed: bool) -> Result<Duration> {
    let broker = crate::broker::start_embedded_broker((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    let config = crate::mqtt::MqttConfig::new("127.0.0.1", broker.addr().port());
    let res = fanout_with(Backend::Mqtt(config), bytes, n_receivers, sealed).await;
    drop(broker);
    res
}

/// Loopback TCP bandwidth in GB/s (10^9 bytes per second) moving `bytes` bytes one way:
/// the bound transfer figures are compared with.
pub async fn loopback_tcp_bandwidth(bytes: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(io("bind loopback"))?;
    let addr = listener.local_addr().map_err(io("loopback address"))?;
    let reader = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.map_err(io("accept loopback"))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            let n = stream.read(&mut buf).await.map_err(io("read loopback"))?;
            if n == 0 {
                return Ok::<usize, Error>(total);
            }
            total += n;
        }
    });
    let block = vec![7u8; 1 << 20];
    let mut stream = TcpStream::connect(addr).await.map_err(io("connect loopback"))?;
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len());
        stream.write_all(&block[..n]).await.map_err(io("write loopback"))?;
        left -= n;
    }
    stream.shutdown().await.map_err(io("close loopback"))?;
    let total = reader.await.unwrap_or_else(|e| panic!("loopback reader panicked: {e}"))?;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(total as f64 / secs / 1e9)
}
