//! The resilient notifier subscriptions against a fake notifier on loopback: the bearer key is
//! sent, a dropped stream is reopened, repeated events are dropped, and a refused subscription
//! ends the stream with an error.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use fledge_client::notifier::{Reconnect, subscribe_compute_with, subscribe_task_with};
use fledge_proto::{
    ComputeSubscription, DeployEvent, Notifier, NotifierServer, TaskEvent, TaskEventKind,
    TaskSubscription,
};

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Default)]
struct Fake {
    task_connections: AtomicUsize,
}

fn event(seq: u64, request: &TaskSubscription) -> Result<TaskEvent, Status> {
    Ok(TaskEvent {
        seq,
        job_id: request.job_id.clone(),
        task_id: request.task_id.clone(),
        kind: TaskEventKind::Start as i32,
    })
}

struct FakeService(Arc<Fake>);

#[tonic::async_trait]
impl Notifier for FakeService {
    type SubscribeTaskStream = EventStream<TaskEvent>;
    type SubscribeComputeStream = EventStream<DeployEvent>;

    async fn subscribe_task(
        &self,
        request: Request<TaskSubscription>,
    ) -> Result<Response<Self::SubscribeTaskStream>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if auth != "Bearer task-key" {
            return Err(Status::unauthenticated(format!("bad key {auth:?}")));
        }
        let sub = request.into_inner();
        let connection = self.0.task_connections.fetch_add(1, Ordering::SeqCst);
        let stream: EventStream<TaskEvent> = match connection {
            // First connection: two events, then the stream ends (a notifier restart).
            0 => futures::stream::iter(vec![event(1, &sub), event(2, &sub)]).boxed(),
            // Second: the server fails mid-stream after re-sending event 2.
            1 => {
                futures::stream::iter(vec![event(2, &sub), Err(Status::unavailable("going away"))])
                    .boxed()
            }
            // Third: event 2 again, then a new one, then the stream stays open.
            _ => futures::stream::iter(vec![event(2, &sub), event(3, &sub)])
                .chain(futures::stream::pending())
                .boxed(),
        };
        Ok(Response::new(stream))
    }

    async fn subscribe_compute(
        &self,
        _request: Request<ComputeSubscription>,
    ) -> Result<Response<Self::SubscribeComputeStream>, Status> {
        Err(Status::not_found("no such compute"))
    }
}

async fn start_fake() -> (String, Arc<Fake>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Arc::new(Fake::default());
    let service = NotifierServer::new(FakeService(fake.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (format!("http://{addr}"), fake)
}

fn fast() -> Reconnect {
    Reconnect { initial: Duration::from_millis(5), max: Duration::from_millis(20) }
}

#[tokio::test]
async fn task_stream_reconnects_and_drops_repeats() {
    let (url, fake) = start_fake().await;
    let mut events =
        subscribe_task_with(&url, None, &"job-1".into(), &"task-1".into(), "task-key", fast());
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("an event within 30 s")
            .expect("the stream does not end")
            .expect("no error");
        assert_eq!(event.task_id, "task-1");
        assert_eq!(event.job_id, "job-1");
        seqs.push(event.seq);
    }
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(fake.task_connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn refused_subscriptions_end_with_an_error() {
    let (url, _fake) = start_fake().await;
    let mut events =
        subscribe_task_with(&url, None, &"job-1".into(), &"task-1".into(), "wrong", fast());
    let err = events.next().await.expect("one item").unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&url) && text.contains("bad key"), "{text}");
    assert!(events.next().await.is_none());

    let mut deploys = subscribe_compute_with(&url, None, &"c1".into(), "k", fast());
    let err = deploys.next().await.expect("one item").unwrap_err();
    assert!(err.to_string().contains("no such compute"), "{err}");
    assert!(deploys.next().await.is_none());

    let mut bad_url = subscribe_task_with("not a url", None, &"j".into(), &"t".into(), "k", fast());
    let err = bad_url.next().await.expect("one item").unwrap_err();
    assert!(err.to_string().contains("not a url"), "{err}");

    // An https notifier is trusted only through a CA: without one the stream says so at once.
    let mut no_ca =
        subscribe_task_with("https://127.0.0.1:1", None, &"j".into(), &"t".into(), "k", fast());
    let err = format!("{:#}", no_ca.next().await.expect("one item").unwrap_err());
    assert!(err.contains("https notifier needs the control plane's CA"), "{err}");
}
