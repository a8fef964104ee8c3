//! Secure aggregation (SecAgg+, `docs/privacy.md`) carried by the synchronous roles.
//!
//! When a job's model spec has `secureAggregation`, each round between an aggregator and its
//! trainers runs the stages of `fledge_algorithms::privacy::secagg` over the channels the
//! round already uses: the aggregator sends on `distribute`, the trainers answer on `upload`.
//! Every SecAgg+ message travels as a `Control` message of the round with the command
//! [`Command::SecAgg`] and one `U8` tensor [`SECAGG`] holding its encoding:
//!
//! | step | aggregator → trainer | trainer → aggregator |
//! |---|---|---|
//! | after the model | `Setup` (round parameters, the trainer's index) | `AdvertiseKeys` |
//! | keys stage closed | the neighbours' keys | `EncryptedShares` |
//! | shares stage closed | the shares addressed to it | after training: `MaskedInput` (its delta from the round's model, quantised, weighted, masked) |
//! | input stage closed | `UnmaskRequest` | `UnmaskShares` |
//!
//! Trainers exchange keys and shares right after they receive the model, then train, so only
//! the masked-input stage waits for training. A trainer that leaves, stays silent past a
//! stage's timeout ([`StageTimeouts`]) or sends an invalid message counts as dropped at that
//! stage; below the threshold the round fails with the library's reason
//! (`SecAggError::BelowThreshold`) before any share is asked for.
//!
//! Which children run the client side is announced as an end property ([`PROP`]): trainers
//! announce [`PROP_CLIENT`], middle aggregators [`PROP_GROUP`] (they mask within their own
//! group and forward the group's unmasked mean upward, as a plain aggregate). An aggregator
//! whose selected children mix the two, or do not announce, refuses the round.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use fledge_algorithms::privacy::secagg::{ClientMessage, ServerMessage};
use fledge_algorithms::privacy::{
    PrivacyConfig, SecAggClient, SecAggConfig, SecAggError, SecAggResult, SecAggServer,
    secagg_optimizer_problem,
};
use fledge_channel::{Channel, Dtype, Message, Tensor};
use fledge_types::{TaskConfig, TaskId};
use futures::StreamExt;

use crate::hyper::{self, names};
use crate::protocol::{Command, SECAGG};
use crate::roles::RoleKind;
use crate::{Error, Result};

/// End property a role announces on its channels when the job runs secure aggregation.
pub const PROP: &str = "secagg";
/// [`PROP`] of a trainer: it runs the client side of each round.
pub const PROP_CLIENT: &str = "client";
/// [`PROP`] of a middle aggregator: it masks within its group and forwards the group's mean.
pub const PROP_GROUP: &str = "group";

/// Default of [`names::SECAGG_STAGE_TIMEOUT`], in seconds.
pub const DEFAULT_STAGE_TIMEOUT_SECS: u64 = 120;

/// Largest stage timeout accepted, in seconds (one day).
const MAX_TIMEOUT_SECS: u64 = 86_400;

/// The roles that carry secure aggregation.
pub fn supported(kind: RoleKind) -> bool {
    matches!(kind, RoleKind::Trainer | RoleKind::TopAggregator | RoleKind::MiddleAggregator)
}

/// The job's `secureAggregation`, parsed and checked with the rest of the task's config:
/// every problem names its field (`modelSpec.secureAggregation.threshold`, central DP with
/// it, a server optimizer that cannot run on a masked sum).
pub fn config_of(config: &TaskConfig) -> Result<Option<SecAggConfig>> {
    let Some(value) = &config.secure_aggregation else {
        return Ok(None);
    };
    let mut sections = serde_json::Map::new();
    sections.insert("secureAggregation".into(), value.clone());
    sections.insert(
        "differentialPrivacy".into(),
        config.differential_privacy.clone().unwrap_or(serde_json::Value::Null),
    );
    let parsed = PrivacyConfig::from_model_spec(&serde_json::Value::Object(sections))
        .map_err(|e| Error::Config(format!("modelSpec.{}: {}", e.field, e.reason)))?;
    if let Some(e) = secagg_optimizer_problem(&config.optimizer.sort) {
        return Err(Error::Config(format!("modelSpec.{}: {}", e.field, e.reason)));
    }
    Ok(parsed.secure_aggregation)
}

/// How long an aggregator waits at each stage of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageTimeouts {
    /// Keys, shares and unmask stages ([`names::SECAGG_STAGE_TIMEOUT`]).
    pub stage: Duration,
    /// The masked-input stage, which includes training ([`names::SECAGG_INPUT_TIMEOUT`]);
    /// `None`: until every trainer sent its input or left.
    pub input: Option<Duration>,
}

impl StageTimeouts {
    /// Reads them from the task's hyperparameters (1 s to one day).
    pub fn from_config(config: &TaskConfig) -> Result<StageTimeouts> {
        let h = &config.hyperparameters;
        let check = |name: &str, secs: u64| {
            if secs > MAX_TIMEOUT_SECS {
                return Err(Error::Hyperparameter {
                    name: name.to_owned(),
                    reason: format!("{secs} s exceeds the limit of {MAX_TIMEOUT_SECS} s (one day)"),
                });
            }
            Ok(Duration::from_secs(secs))
        };
        let stage = check(
            names::SECAGG_STAGE_TIMEOUT,
            hyper::uint(h, names::SECAGG_STAGE_TIMEOUT, DEFAULT_STAGE_TIMEOUT_SECS, 1)?,
        )?;
        let input = match h.get(names::SECAGG_INPUT_TIMEOUT) {
            None | Some(serde_json::Value::Null) => None,
            Some(_) => Some(check(
                names::SECAGG_INPUT_TIMEOUT,
                hyper::uint(h, names::SECAGG_INPUT_TIMEOUT, 0, 1)?,
            )?),
        };
        Ok(StageTimeouts { stage, input })
    }
}

/// A `Control` message of `round` carrying one encoded SecAgg+ message.
pub fn wrap(round: u64, encoded: Vec<u8>) -> Result<Message> {
    let len = encoded.len();
    let tensor = Tensor::from_u8(vec![len], Bytes::from(encoded))
        .map_err(|e| Error::Tensors(format!("tensor {SECAGG}: {e}")))?;
    Ok(Command::SecAgg.message(round).with_tensor(SECAGG, tensor))
}

/// The encoded SecAgg+ message `peer` sent in `message` (a [`Command::SecAgg`] control
/// message with one `U8` tensor [`SECAGG`]).
pub fn payload<'a>(peer: &TaskId, message: &'a Message) -> Result<&'a [u8]> {
    let bad = |reason: String| Error::Protocol { peer: peer.clone(), reason };
    if !Command::SecAgg.is(message) {
        return Err(bad(format!(
            "expected a secure-aggregation message for round {}, got a {:?} message",
            message.round, message.kind
        )));
    }
    match message.tensors.get(SECAGG) {
        Some(t) if t.dtype() == Dtype::U8 && message.tensors.len() == 1 => Ok(&t.data()[..]),
        _ => Err(bad(format!(
            "secure-aggregation message for round {} must carry exactly one U8 tensor {SECAGG:?}",
            message.round
        ))),
    }
}

fn privacy(e: SecAggError) -> Error {
    Error::Privacy(e.to_string())
}

/// What a secure round produced, and who dropped where.
#[derive(Clone, Debug, PartialEq)]
pub struct SecureRound {
    /// The weighted mean of the survivors' deltas, with their total weight.
    pub result: SecAggResult,
    /// Trainers counted as dropped at each stage: keys, shares, masked input, unmask.
    pub dropped: [usize; 4],
    /// The ends whose updates are in the mean.
    pub contributors: Vec<TaskId>,
    /// The ends that are not.
    pub missing: Vec<TaskId>,
}

/// The names of the four stages, as in the metrics `secagg.dropped.<stage>`.
pub const STAGES: [&str; 4] = ["keys", "shares", "input", "unmask"];

/// Runs the aggregator's side of one SecAgg+ round with `ends` (client `i` is `ends[i]`),
/// whose model for `round` was already sent: setup, keys, shares, masked inputs, unmasking.
/// `observe` sees every message received from a trainer before it is decoded (what the
/// aggregator learns, byte for byte). Fails with [`Error::Privacy`] and the library's reason
/// when too few trainers remain at any stage; nothing individual is revealed then.
#[allow(clippy::too_many_arguments)] // one round's whole context
pub async fn server_round(
    distribute: &Channel,
    aggregate: &Channel,
    ends: &[TaskId],
    config: &SecAggConfig,
    round: u64,
    num_params: usize,
    timeouts: StageTimeouts,
    observe: &mut (dyn FnMut(&TaskId, &Message) + Send),
) -> Result<SecureRound> {
    let n = u32::try_from(ends.len())
        .map_err(|_| Error::Config(format!("{} trainers in one round", ends.len())))?;
    let (server, setups) =
        SecAggServer::new(config, round, n, num_params as u64).map_err(privacy)?;
    let mut server = server;
    for (i, setup) in setups.into_iter().enumerate() {
        send(distribute, &ends[i], round, &setup).await?;
    }
    let mut dropped = [0usize; 4];
    for (k, timeout) in
        [Some(timeouts.stage), Some(timeouts.stage), timeouts.input].into_iter().enumerate()
    {
        server = collect(aggregate, server, ends, round, STAGES[k], timeout, observe).await?;
        dropped[k] = server.pending().len();
        let (back, out) = tokio::task::spawn_blocking(move || {
            let out = server.close_stage();
            (server, out)
        })
        .await?;
        server = back;
        for (i, message) in out.map_err(privacy)? {
            send(distribute, &ends[i as usize], round, &message).await?;
        }
    }
    server =
        collect(aggregate, server, ends, round, STAGES[3], Some(timeouts.stage), observe).await?;
    dropped[3] = server.pending().len();
    let (_, result) = tokio::task::spawn_blocking(move || {
        let res = server.finish();
        (server, res)
    })
    .await?;
    let result = result.map_err(privacy)?;
    let ins: BTreeSet<u32> = result.contributors.iter().copied().collect();
    let (contributors, missing) = (0..n)
        .map(|i| (ins.contains(&i), ends[i as usize].clone()))
        .fold((Vec::new(), Vec::new()), |(mut c, mut m), (is_in, end)| {
            if is_in {
                c.push(end)
            } else {
                m.push(end)
            }
            (c, m)
        });
    Ok(SecureRound { result, dropped, contributors, missing })
}

/// Sends `message` to `end`; an end that already left is simply dropped from the round.
async fn send(channel: &Channel, end: &TaskId, round: u64, message: &ServerMessage) -> Result<()> {
    match channel.send(end, wrap(round, message.encode())?).await {
        Ok(()) => Ok(()),
        Err(fledge_channel::Error::UnknownEnd { .. } | fledge_channel::Error::EndLeft { .. }) => {
            tracing::warn!(%end, round, "trainer left during secure aggregation; dropped");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Receives the current stage's messages until every trainer it waits for answered, left,
/// or `timeout` passed. An invalid message is logged and ignored (its sender may still send
/// a valid one in time); a sender that sends none counts as dropped.
async fn collect(
    aggregate: &Channel,
    mut server: SecAggServer,
    ends: &[TaskId],
    round: u64,
    stage: &'static str,
    timeout: Option<Duration>,
    observe: &mut (dyn FnMut(&TaskId, &Message) + Send),
) -> Result<SecAggServer> {
    let index: BTreeMap<&TaskId, u32> = ends.iter().zip(0u32..).collect();
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    'listen: loop {
        let pending: Vec<TaskId> =
            server.pending().into_iter().map(|i| ends[i as usize].clone()).collect();
        if pending.is_empty() {
            return Ok(server);
        }
        let mut stream = Box::pin(aggregate.recv_fifo(&pending, pending.len()));
        loop {
            let next = match deadline {
                Some(at) => match tokio::time::timeout_at(at, stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        tracing::warn!(round, stage, silent = ?pending_names(&server, ends),
                            "secure aggregation stage timed out; silent trainers count as dropped");
                        return Ok(server);
                    }
                },
                None => stream.next().await,
            };
            let Some(item) = next else {
                // Everyone still pending has left.
                return Ok(server);
            };
            let (end, message) = item?;
            observe(&end, &message);
            let Some(&i) = index.get(&end) else { continue };
            if message.round != round || !Command::SecAgg.is(&message) {
                tracing::warn!(%end, kind = ?message.kind, got = message.round, round, stage,
                    "stale or unexpected message ignored");
                continue 'listen;
            }
            let (back, res) = tokio::task::spawn_blocking(move || {
                let res = payload(&end, &message).and_then(|bytes| {
                    let decoded = ClientMessage::decode(bytes).map_err(|e| Error::Protocol {
                        peer: end.clone(),
                        reason: e.to_string(),
                    })?;
                    server.receive(i, &decoded).map_err(privacy)
                });
                (server, res.map_err(|e| (end, e)))
            })
            .await?;
            server = back;
            if let Err((end, e)) = res {
                tracing::warn!(%end, round, stage, error = %e, "secure aggregation message rejected");
                continue 'listen;
            }
        }
    }
}

fn pending_names(server: &SecAggServer, ends: &[TaskId]) -> Vec<String> {
    server.pending().into_iter().map(|i| ends[i as usize].as_str().to_owned()).collect()
}

/// The trainer's next SecAgg+ message of `round` from `aggregator`, decoded. `None` when the
/// aggregator went on without this trainer (its next message is a model or the end of
/// training, left queued for `fetch`) or left: the trainer then sits the round out.
pub async fn next_server_message(
    fetch: &Channel,
    aggregator: &TaskId,
    round: u64,
) -> Result<Option<ServerMessage>> {
    loop {
        if fetch.await_queued(aggregator).await.is_err() {
            return Ok(None);
        }
        let Some(next) = fetch.peek(aggregator) else { continue };
        if !Command::SecAgg.is(&next) {
            return Ok(None);
        }
        let message = match fetch.recv(aggregator).await {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        if message.round != round {
            tracing::warn!(%aggregator, got = message.round, round,
                "secure-aggregation message of another round ignored");
            continue;
        }
        let bytes = payload(aggregator, &message)?;
        return ServerMessage::decode(bytes)
            .map(Some)
            .map_err(|e| Error::Protocol { peer: aggregator.clone(), reason: e.to_string() });
    }
}

/// What a trainer does with a client-side error: below the threshold (too few of its
/// neighbours left) it sits the round out, which the aggregator sees as a dropout; anything
/// else (a lying or broken aggregator) fails the task.
pub fn client_error(e: SecAggError) -> Result<()> {
    match e {
        SecAggError::BelowThreshold { .. } => {
            tracing::warn!(error = %e, "secure aggregation: sitting this round out");
            Ok(())
        }
        e => Err(privacy(e)),
    }
}

/// The client of a round, from the aggregator's setup.
pub fn join_round(
    config: &SecAggConfig,
    setup: &ServerMessage,
) -> Result<(SecAggClient, ClientMessage)> {
    SecAggClient::new(config, setup).map_err(privacy)
}
