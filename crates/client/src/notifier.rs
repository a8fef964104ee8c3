//! Notifier subscriptions that survive disconnects.
//!
//! [`subscribe_task`] (agents) and [`subscribe_compute`] (deployers) open the notifier's server
//! stream with `authorization: Bearer <key>` metadata and return a stream of events that never
//! ends on its own: when the connection drops or the notifier is down, it reconnects after a
//! [`Backoff`] delay (exponential, capped, with jitter). The notifier numbers events per
//! subscriber and re-sends undelivered ones on reconnect, so the stream drops every event whose
//! sequence number is not above the last one delivered.
//!
//! The stream yields an `Err` and ends only for failures that retrying cannot fix: an invalid
//! URL or key, or a notifier that rejects the subscription (`Unauthenticated`,
//! `PermissionDenied`, `NotFound`, `InvalidArgument`).

use std::future::Future;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status, Streaming};

use fledge_proto::{ComputeSubscription, DeployEvent, NotifierClient, TaskEvent, TaskSubscription};
use fledge_tls::Ca;
use fledge_types::{ComputeId, JobId, TaskId};

use crate::error::{Error, Result};

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval of HTTP/2 pings on a stream, and how long a ping may go unanswered before the
/// connection is declared dead.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// Reconnect policy of a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconnect {
    /// Delay before the first retry; doubles per failed attempt. Default 200 ms.
    pub initial: Duration,
    /// Upper bound of the delay. Default 10 s.
    pub max: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self { initial: Duration::from_millis(200), max: Duration::from_secs(10) }
    }
}

/// The reconnect delays of one subscription: exponential with a cap and "equal jitter"
/// (backon's exponential backoff): each delay is uniform in `[d/2, d)` where `d` doubles per
/// attempt from `initial` up to `max`, so many clients that lost the same notifier do not
/// reconnect in lockstep.
#[derive(Debug)]
pub struct Backoff {
    builder: backon::ExponentialBuilder,
    delays: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// A backoff that starts at `policy.initial`.
    pub fn new(policy: Reconnect) -> Self {
        let initial = policy.initial.max(Duration::from_millis(2));
        let max = policy.max.max(initial);
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(initial / 2)
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self { builder, delays: backon::BackoffBuilder::build(builder), max }
    }

    /// The next delay to wait; each call doubles the base up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        // Without a cap on attempts the delays never end; the cap is the fallback.
        self.delays.next().unwrap_or(self.max)
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.delays = backon::BackoffBuilder::build(self.builder);
    }
}

/// Events for one task's agent (start, stop), reconnecting with the default policy.
///
/// An `https://` notifier's certificate is checked against `ca` and nothing else; an https
/// URL without a CA is an error.
pub fn subscribe_task(
    notifier_url: &str,
    ca: Option<&Ca>,
    job: &JobId,
    task: &TaskId,
    key: &str,
) -> BoxStream<'static, Result<TaskEvent>> {
    subscribe_task_with(notifier_url, ca, job, task, key, Reconnect::default())
}

/// [`subscribe_task`] with an explicit reconnect policy.
pub fn subscribe_task_with(
    notifier_url: &str,
    ca: Option<&Ca>,
    job: &JobId,
    task: &TaskId,
    key: &str,
    reconnect: Reconnect,
) -> BoxStream<'static, Result<TaskEvent>> {
    let subscription = TaskSubscription { job_id: job.to_string(), task_id: task.to_string() };
    resilient(
        notifier_url,
        ca,
        key,
        reconnect,
        move |mut client, request| {
            let request = request.map(|()| subscription.clone());
            async move { client.subscribe_task(request).await.map(tonic::Response::into_inner) }
        },
        |event: &TaskEvent| event.seq,
    )
}

/// Events for one compute's deployer (deploy, revoke), reconnecting with the default policy.
pub fn subscribe_compute(
    notifier_url: &str,
    ca: Option<&Ca>,
    compute: &ComputeId,
    key: &str,
) -> BoxStream<'static, Result<DeployEvent>> {
    subscribe_compute_with(notifier_url, ca, compute, key, Reconnect::default())
}

/// [`subscribe_compute`] with an explicit reconnect policy.
pub fn subscribe_compute_with(
    notifier_url: &str,
    ca: Option<&Ca>,
    compute: &ComputeId,
    key: &str,
    reconnect: Reconnect,
) -> BoxStream<'static, Result<DeployEvent>> {
    let subscription = ComputeSubscription { compute_id: compute.to_string() };
    resilient(
        notifier_url,
        ca,
        key,
        reconnect,
        move |mut client, request| {
            let request = request.map(|()| subscription.clone());
            async move { client.subscribe_compute(request).await.map(tonic::Response::into_inner) }
        },
        |event: &DeployEvent| event.seq,
    )
}

/// TLS for an `https://` URL, trusting exactly `ca`.
fn with_tls(
    endpoint: Endpoint,
    url: &str,
    ca: Option<&Ca>,
) -> std::result::Result<Endpoint, String> {
    if !url.trim_start().starts_with("https://") {
        return Ok(endpoint);
    }
    let ca = ca.ok_or_else(|| {
        "an https notifier needs the control plane's CA (--ca-file or --ca-fingerprint)".to_owned()
    })?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem()));
    endpoint.tls_config(tls).map_err(|err| err.to_string())
}

/// Whether retrying cannot help.
fn is_fatal(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument
    )
}

struct State<E, F> {
    endpoint: Option<Endpoint>,
    url: String,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    open: F,
    seq_of: fn(&E) -> u64,
    stream: Option<Streaming<E>>,
    last_seq: u64,
    backoff: Backoff,
    setup_error: Option<Error>,
    done: bool,
}

/// A stream over `open`'s server stream that reconnects on failure and drops repeated events.
fn resilient<E, F, Fut>(
    url: &str,
    ca: Option<&Ca>,
    key: &str,
    reconnect: Reconnect,
    open: F,
    seq_of: fn(&E) -> u64,
) -> BoxStream<'static, Result<E>>
where
    E: Send + 'static,
    F: FnMut(NotifierClient<Channel>, tonic::Request<()>) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<Streaming<E>, Status>> + Send,
{
    let mut setup_error = None;
    let endpoint = match Endpoint::from_shared(url.to_owned())
        .map_err(|err| err.to_string())
        .and_then(|endpoint| {
            // HTTP/2 pings on the idle stream: a notifier cut off by the network (no FIN, no
            // RST) ends the stream within KEEPALIVE × 2, and it is reopened from where it was.
            let endpoint = endpoint
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE)
                .keep_alive_timeout(KEEPALIVE)
                .keep_alive_while_idle(true);
            with_tls(endpoint, url, ca)
        }) {
        Ok(endpoint) => Some(endpoint),
        Err(reason) => {
            setup_error = Some(Error::InvalidEndpoint { endpoint: url.to_owned(), reason });
            None
        }
    };
    let authorization = match MetadataValue::try_from(format!("Bearer {key}")) {
        Ok(value) => Some(value),
        Err(_) => {
            setup_error.get_or_insert(Error::InvalidSecret { what: "key" });
            None
        }
    };
    let state = State {
        endpoint,
        url: url.to_owned(),
        authorization,
        open,
        seq_of,
        stream: None,
        last_seq: 0,
        backoff: Backoff::new(reconnect),
        setup_error,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        let item = next_event(&mut state).await?;
        Some((item, state))
    })
    .boxed()
}

/// The next item of a resilient stream, or `None` once it has ended.
async fn next_event<E, F, Fut>(state: &mut State<E, F>) -> Option<Result<E>>
where
    F: FnMut(NotifierClient<Channel>, tonic::Request<()>) -> Fut,
    Fut: Future<Output = std::result::Result<Streaming<E>, Status>>,
{
    if state.done {
        return None;
    }
    if let Some(err) = state.setup_error.take() {
        state.done = true;
        return Some(Err(err));
    }
    let (Some(endpoint), Some(authorization)) = (&state.endpoint, &state.authorization) else {
        // Unreachable: both are set whenever there was no setup error.
        state.done = true;
        return None;
    };
    loop {
        let Some(stream) = state.stream.as_mut() else {
            match endpoint.connect().await {
                Ok(channel) => {
                    let mut request = tonic::Request::new(());
                    request.metadata_mut().insert("authorization", authorization.clone());
                    match (state.open)(NotifierClient::new(channel), request).await {
                        Ok(stream) => {
                            tracing::debug!(url = %state.url, "subscribed to the notifier");
                            state.stream = Some(stream);
                            continue;
                        }
                        Err(status) if is_fatal(status.code()) => {
                            state.done = true;
                            return Some(Err(refused(&state.url, &status)));
                        }
                        Err(status) => {
                            tracing::warn!(url = %state.url, code = ?status.code(), message = status.message(), "notifier subscription failed; retrying");
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(url = %state.url, error = %err, "cannot reach the notifier; retrying");
                }
            }
            tokio::time::sleep(state.backoff.next_delay()).await;
            continue;
        };
        match stream.message().await {
            Ok(Some(event)) => {
                state.backoff.reset();
                let seq = (state.seq_of)(&event);
                if seq != 0 && seq <= state.last_seq {
                    tracing::debug!(seq, last = state.last_seq, "dropping a repeated event");
                    continue;
                }
                state.last_seq = state.last_seq.max(seq);
                return Some(Ok(event));
            }
            Ok(None) => {
                tracing::info!(url = %state.url, "notifier closed the stream; reconnecting");
            }
            Err(status) if is_fatal(status.code()) => {
                state.done = true;
                return Some(Err(refused(&state.url, &status)));
            }
            Err(status) => {
                tracing::warn!(url = %state.url, code = ?status.code(), message = status.message(), "notifier stream broke; reconnecting");
            }
        }
        state.stream = None;
        tokio::time::sleep(state.backoff.next_delay()).await;
    }
}

fn refused(url: &str, status: &Status) -> Error {
    Error::Notifier {
        endpoint: url.to_owned(),
        code: format!("{:?}", status.code()),
        message: status.message().to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Reconnect {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
        });
        let bounds = [(50, 100), (100, 200), (175, 350), (175, 350)];
        for (low, high) in bounds {
            let delay = backoff.next_delay();
            assert!(
                delay >= Duration::from_millis(low) && delay <= Duration::from_millis(high),
                "{delay:?} not in [{low}, {high}] ms"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn only_unfixable_statuses_end_the_stream() {
        assert!(is_fatal(Code::Unauthenticated));
        assert!(is_fatal(Code::NotFound));
        assert!(!is_fatal(Code::Unavailable));
        assert!(!is_fatal(Code::Internal));
    }
}
