//! The data-plane message vocabulary of the built-in roles, in one place.
//!
//! Every message is a `fledge-channel` [`Message`] (kind, round, model version, meta,
//! tensors); this module says what the roles put in them:
//!
//! | from → to | kind | round | meta | tensors |
//! |---|---|---|---|---|
//! | aggregator → trainer | `Weights` | r (1-based) | [`UPLOAD_GRANTS`] k | global model |
//! | trainer → aggregator | `Update` | r | [`NUM_SAMPLES`], [`METRICS`] | local weights |
//! | aggregator → one trainer | `Control` | 0 | [`Command::InitModel`] | |
//! | that trainer → aggregator | `Weights` | 0 | | its initial weights |
//! | trainer → aggregator | `Control` | r | [`Command::Ready`] (grants only) | |
//! | aggregator → trainer | `Control` | r | [`Command::GrantUpload`] | |
//! | aggregator → trainers | `EndOfTraining` | last | | final model |
//! | aggregator ↔ trainer | `Control` | r | [`Command::SecAgg`] (secure aggregation only) | [`SECAGG`]: one encoded SecAgg+ message |
//!
//! The ring ([`Command::Ready`], [`Command::Members`]), the coordinator ([`Command::Plan`],
//! [`Command::Assign`]) and vertical learning ([`Command::Ids`], [`Command::Align`],
//! [`Command::Abort`], [`Command::Embed`], [`Command::Gradient`]) add their commands; their
//! module docs give the exchanges.
//!
//! The headers of the two messages every FL round carries are typed: [`Model`] (down) and
//! [`Update`] (up), each with `encode` (stamp the header on a message holding the tensors) and
//! `decode` (read it back from a peer's message, every field checked).
//!
//! Commands are a type of their own ([`Command`]), distinct from the function tags of
//! channels (`crate::roles::tags`), even where a word is the same on the wire (`upload`).
//!
//! Numbers that come from peers are checked here: an impossible value (a model for round 0
//! where a round ≥ 1 is due, a sample count of 0 or beyond 2^53, a non-finite weight) is an
//! [`Error::Protocol`] naming the sender, never an underflow, overflow or panic.

use std::collections::BTreeMap;

use fledge_channel::{Channel, Kind, Message};
use fledge_types::TaskId;
use serde_json::Value;

use crate::{Error, Result};

/// Meta key of a control message's command.
pub const COMMAND: &str = "command";
/// Meta key of a `Weights` message: how many uploads its sender grants at once this round;
/// 0 or absent means no grants (upload as soon as trained).
pub const UPLOAD_GRANTS: &str = "uploadGrants";
/// Meta key of an update: the samples it was trained on (the FedAvg weight), ≥ 1.
pub const NUM_SAMPLES: &str = "num_samples";
/// Meta key of an update: the trainer's metrics (name → number).
pub const METRICS: &str = "metrics";

/// Largest sample count a peer may claim: 2^53, the largest integer every f64 (the
/// aggregators' weights) represents exactly.
pub const MAX_SAMPLES: u64 = 1 << 53;

/// A control message's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Aggregator → trainer: send your initial weights (round 0).
    InitModel,
    /// Trainer → aggregator: my update is ready (under upload grants). Ring member → leader:
    /// I am here for round r (0: I need the group's model).
    Ready,
    /// Aggregator → trainer: upload now (wire word `upload`).
    GrantUpload,
    /// Ring leader → members: this round's members.
    Members,
    /// Top aggregator ↔ coordinator: the round's plan.
    Plan,
    /// Coordinator → middle aggregators and trainers: the round's assignment.
    Assign,
    /// Feature party → label party: my sample ids.
    Ids,
    /// Label party → feature parties: the aligned train and test ids.
    Align,
    /// Label party → feature parties: alignment failed.
    Abort,
    /// Label party → feature party: embed these rows.
    Embed,
    /// Label party → feature party: the gradient of the loss for your embedding.
    Gradient,
    /// Aggregator ↔ trainer: one message of a secure-aggregation round (a tensor [`SECAGG`]
    /// of encoded bytes; `crate::roles::secagg`).
    SecAgg,
}

/// Tensor name of a [`Command::SecAgg`] message: the encoded SecAgg+ message (`U8`).
pub const SECAGG: &str = "secagg";

impl Command {
    const ALL: [Command; 12] = [
        Command::InitModel,
        Command::Ready,
        Command::GrantUpload,
        Command::Members,
        Command::Plan,
        Command::Assign,
        Command::Ids,
        Command::Align,
        Command::Abort,
        Command::Embed,
        Command::Gradient,
        Command::SecAgg,
    ];

    /// The word on the wire.
    pub fn word(self) -> &'static str {
        match self {
            Command::InitModel => "init_model",
            Command::Ready => "ready",
            Command::GrantUpload => "upload",
            Command::Members => "members",
            Command::Plan => "plan",
            Command::Assign => "assign",
            Command::Ids => "ids",
            Command::Align => "align",
            Command::Abort => "abort",
            Command::Embed => "embed",
            Command::Gradient => "gradient",
            Command::SecAgg => "secagg",
        }
    }

    /// The command of a control message (none for other kinds or unknown words).
    pub fn of(message: &Message) -> Option<Command> {
        if message.kind != Kind::Control {
            return None;
        }
        let word = message.meta.get(COMMAND).and_then(Value::as_str)?;
        Command::ALL.into_iter().find(|c| c.word() == word)
    }

    /// Whether `message` is this command.
    pub fn is(self, message: &Message) -> bool {
        Command::of(message) == Some(self)
    }

    /// A control message of this command for `round`.
    pub fn message(self, round: u64) -> Message {
        Message::new(Kind::Control, round).with_meta(COMMAND, self.word())
    }
}

/// Most metrics an update may carry; more is a protocol error (a peer must not grow the
/// aggregator's tables without bound).
pub const MAX_METRICS: usize = 256;
/// Longest metric name an update may carry, in bytes.
pub const MAX_METRIC_NAME: usize = 128;

/// The header of a model sent down to trainers (kind `Weights`; tensors: the model). Round ≥ 1
/// for a round's global model; 0 for a trainer's initial weights answering
/// [`Command::InitModel`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// The round the model is for.
    pub round: u64,
    /// The version of the model.
    pub model_version: u64,
    /// Uploads granted at once this round (0: upload as soon as trained); see [`UPLOAD_GRANTS`].
    pub upload_grants: u64,
}

impl Model {
    /// `body` (a message holding the model's tensors) with this header.
    pub fn encode(self, mut body: Message) -> Message {
        body.kind = Kind::Weights;
        body.round = self.round;
        body.model_version = self.model_version;
        if self.upload_grants > 0 {
            body = body.with_meta(UPLOAD_GRANTS, self.upload_grants);
        }
        body
    }

    /// The header of `peer`'s `Weights` message; grants must be a non-negative integer.
    pub fn decode(peer: &TaskId, message: &Message) -> Result<Model> {
        expect_kind(peer, message, Kind::Weights)?;
        let upload_grants = match message.meta.get(UPLOAD_GRANTS) {
            None => 0,
            Some(v) => v.as_u64().ok_or_else(|| Error::Protocol {
                peer: peer.clone(),
                reason: format!(
                    "model for round {} has {UPLOAD_GRANTS} {v}, not a count",
                    message.round
                ),
            })?,
        };
        Ok(Model { round: message.round, model_version: message.model_version, upload_grants })
    }
}

/// The header of an update sent up to an aggregator (kind `Update`; tensors: the local or
/// partially aggregated weights).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Update {
    /// The round it was trained in.
    pub round: u64,
    /// The version of the model it was trained from.
    pub model_version: u64,
    /// The samples it stands for (its FedAvg weight), in 1..=[`MAX_SAMPLES`].
    pub num_samples: u64,
    /// The sender's metrics (name → finite number), at most [`MAX_METRICS`].
    pub metrics: BTreeMap<String, f64>,
}

impl Update {
    /// `body` (a message holding the update's tensors) with this header.
    pub fn encode(self, mut body: Message) -> Message {
        body.kind = Kind::Update;
        body.round = self.round;
        body.model_version = self.model_version;
        // JSON has no NaN or infinity: a non-finite metric is left out, not sent as null.
        let metrics: serde_json::Map<String, Value> = self
            .metrics
            .into_iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| (k, Value::from(v)))
            .collect();
        body.with_meta(NUM_SAMPLES, self.num_samples).with_meta(METRICS, Value::Object(metrics))
    }

    /// The header of `peer`'s update, every number checked: the sample count (see
    /// [`num_samples`]) and the metrics (an object of at most [`MAX_METRICS`] finite numbers
    /// with names of at most [`MAX_METRIC_NAME`] bytes).
    pub fn decode(peer: &TaskId, message: &Message) -> Result<Update> {
        expect_kind(peer, message, Kind::Update)?;
        let num_samples = num_samples(peer, message)?;
        let bad = |reason: String| Error::Protocol { peer: peer.clone(), reason };
        let mut metrics = BTreeMap::new();
        match message.meta.get(METRICS) {
            None => {}
            Some(Value::Object(map)) => {
                if map.len() > MAX_METRICS {
                    return Err(bad(format!(
                        "update for round {} has {} metrics, more than {MAX_METRICS}",
                        message.round,
                        map.len()
                    )));
                }
                for (name, value) in map {
                    if name.is_empty() || name.len() > MAX_METRIC_NAME {
                        return Err(bad(format!(
                            "update for round {} has a metric name of {} bytes, not 1..={MAX_METRIC_NAME}",
                            message.round,
                            name.len()
                        )));
                    }
                    match value.as_f64() {
                        Some(v) if v.is_finite() => {
                            metrics.insert(name.clone(), v);
                        }
                        _ => {
                            return Err(bad(format!(
                                "update for round {} has metric {name:?} = {value}, not a finite number",
                                message.round
                            )));
                        }
                    }
                }
            }
            Some(other) => {
                return Err(bad(format!(
                    "update for round {} has {METRICS} {other}, not an object",
                    message.round
                )));
            }
        }
        Ok(Update {
            round: message.round,
            model_version: message.model_version,
            num_samples,
            metrics,
        })
    }
}

fn expect_kind(peer: &TaskId, message: &Message, kind: Kind) -> Result<()> {
    if message.kind == kind {
        return Ok(());
    }
    Err(Error::Protocol {
        peer: peer.clone(),
        reason: format!("{:?} message where {kind:?} is due", message.kind),
    })
}

/// The channel error a role sees when a peer it talks to is gone (it left while we waited
/// for it, or it was not there to send to) as [`Error::PeerLeft`]; other errors unchanged.
pub fn peer_left(e: fledge_channel::Error) -> Error {
    match e {
        fledge_channel::Error::EndLeft { end, channel }
        | fledge_channel::Error::UnknownEnd { end, channel, .. } => {
            Error::PeerLeft { peer: end, channel }
        }
        e => e.into(),
    }
}

/// Waits for `parent`, an aggregator (or the coordinator, or the top aggregator for the
/// coordinator) that left `channel`, to come back: the controller restarts a failed one under
/// its id and it resumes from its last round. Past
/// `timeout` the wait fails with [`Error::PeerLeft`] naming it.
pub async fn await_parent(
    channel: &Channel,
    parent: &TaskId,
    timeout: std::time::Duration,
) -> Result<()> {
    tracing::warn!(%parent, channel = channel.name(), timeout_secs = timeout.as_secs(),
        "peer left; waiting for it to come back under the same id");
    match channel.await_end(parent, timeout).await {
        Ok(()) => {
            tracing::info!(%parent, channel = channel.name(), "peer is back");
            Ok(())
        }
        Err(fledge_channel::Error::JoinTimeout { .. }) => {
            Err(Error::PeerLeft { peer: parent.clone(), channel: channel.name().to_owned() })
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether `res` failed because `parent` left: a child then goes back to waiting for its
/// next model (the aggregator, restarted, redoes the round), instead of failing.
pub fn parent_left<T>(res: &Result<T>, parent: &TaskId) -> bool {
    matches!(res, Err(Error::PeerLeft { peer, .. }) if peer == parent)
}

/// The sample count of `peer`'s update: an integer in 1..=[`MAX_SAMPLES`].
pub fn num_samples(peer: &TaskId, message: &Message) -> Result<u64> {
    let bad = |reason: String| Error::Protocol { peer: peer.clone(), reason };
    match message.meta.get(NUM_SAMPLES) {
        None => Err(bad(format!("update for round {} has no {NUM_SAMPLES}", message.round))),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_SAMPLES).contains(&n) => Ok(n),
            _ => Err(bad(format!(
                "update for round {} has {NUM_SAMPLES} {v}, not an integer in 1..=2^53",
                message.round
            ))),
        },
    }
}

/// The round before the one `message` (from `peer`) is for: a model for round r ≥ 1 comes
/// after round r − 1. Round 0 is a protocol error.
pub fn round_before(peer: &TaskId, message: &Message) -> Result<u64> {
    message.round.checked_sub(1).ok_or_else(|| Error::Protocol {
        peer: peer.clone(),
        reason: format!("{:?} message for round 0 where a round ≥ 1 is due", message.kind),
    })
}

/// Fails with a protocol error naming `peer` when `values` (what it sent for `what`) hold a
/// NaN or an infinity, like the aggregators reject such updates.
pub fn check_finite(peer: &TaskId, what: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Protocol {
            peer: peer.clone(),
            reason: format!("{what} holds a non-finite value ({}) at index {i}", values[i]),
        }),
    }
}

/// Under upload grants (`grants` > 0, from the last `Weights` message), announces
/// [`Command::Ready`] for `round` to `peer` on `upload` and waits on `fetch` for its
/// [`Command::GrantUpload`]; returns at once otherwise.
pub async fn await_upload_permit(
    grants: u64,
    fetch: &Channel,
    upload: &Channel,
    peer: &TaskId,
    round: u64,
) -> Result<()> {
    if grants == 0 {
        return Ok(());
    }
    upload.send(peer, Command::Ready.message(round)).await.map_err(peer_left)?;
    loop {
        fetch.await_queued(peer).await.map_err(peer_left)?;
        if fetch.peek(peer).is_some_and(|m| matches!(m.kind, Kind::Weights | Kind::EndOfTraining)) {
            // A model while waiting for a grant: the aggregator was restarted and redoes the
            // round (or ended). The model stays queued for the next fetch; this update is
            // dropped as if the aggregator had left.
            tracing::warn!(%peer, round, "new model while waiting for the upload grant; the aggregator restarted");
            return Err(Error::PeerLeft { peer: peer.clone(), channel: fetch.name().to_owned() });
        }
        let message = fetch.recv(peer).await.map_err(peer_left)?;
        if message.round == round && Command::GrantUpload.is(&message) {
            return Ok(());
        }
        tracing::warn!(kind = ?message.kind, round = message.round, "ignored while waiting for the upload grant");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_differ_from_tags() {
        for c in Command::ALL {
            assert_eq!(Command::of(&c.message(3)), Some(c));
        }
        let not_control = Message::new(Kind::Weights, 1).with_meta(COMMAND, "ready");
        assert_eq!(Command::of(&not_control), None);
        let unknown = Message::new(Kind::Control, 1).with_meta(COMMAND, "dance");
        assert_eq!(Command::of(&unknown), None);
    }

    #[test]
    fn peer_numbers_are_checked_and_name_the_sender() {
        let peer = TaskId::from("t7");
        let update = |v: Value| Message::new(Kind::Update, 2).with_meta(NUM_SAMPLES, v);
        assert_eq!(num_samples(&peer, &update(Value::from(5))).expect("valid"), 5);
        for bad in [Value::from(0), Value::from(-3), Value::from(1.5), Value::from(u64::MAX)] {
            let err = num_samples(&peer, &update(bad.clone())).unwrap_err().to_string();
            assert!(err.contains("t7") && err.contains("num_samples"), "{bad}: {err}");
        }
        let missing = Message::new(Kind::Update, 2);
        assert!(num_samples(&peer, &missing).unwrap_err().to_string().contains("has no"));
        let zero = Message::new(Kind::Weights, 0);
        let err = round_before(&peer, &zero).unwrap_err().to_string();
        assert!(err.contains("t7") && err.contains("round 0"), "{err}");
        assert_eq!(round_before(&peer, &Message::new(Kind::Weights, 4)).expect("r4"), 3);
        let err = check_finite(&peer, "chunk", &[1.0, f32::NAN]).unwrap_err().to_string();
        assert!(err.contains("t7") && err.contains("index 1"), "{err}");
        check_finite(&peer, "chunk", &[1.0, -2.0]).expect("finite");
    }

    #[test]
    fn typed_headers_round_trip_and_reject_what_a_peer_must_not_send() {
        let peer = TaskId::from("t9");
        let model = Model { round: 4, model_version: 3, upload_grants: 2 };
        let m = model.encode(Message::new(Kind::Control, 0));
        assert_eq!((m.kind, m.round, m.model_version), (Kind::Weights, 4, 3));
        assert_eq!(Model::decode(&peer, &m).expect("model"), model);
        let no_grants = Model { upload_grants: 0, ..model }.encode(Message::new(Kind::Weights, 0));
        assert!(!no_grants.meta.contains_key(UPLOAD_GRANTS));
        let bad_grants = Message::new(Kind::Weights, 1).with_meta(UPLOAD_GRANTS, -1);
        assert!(Model::decode(&peer, &bad_grants).unwrap_err().to_string().contains("t9"));

        let update = Update {
            round: 2,
            model_version: 1,
            num_samples: 600,
            metrics: BTreeMap::from([("afterTraining.accuracy".to_owned(), 0.9)]),
        };
        let m = update.clone().encode(Message::new(Kind::Weights, 0));
        assert_eq!(m.kind, Kind::Update);
        assert_eq!(Update::decode(&peer, &m).expect("update"), update);
        let err = Update::decode(&peer, &Message::new(Kind::Weights, 2)).unwrap_err().to_string();
        assert!(err.contains("where Update is due"), "{err}");

        let with_metrics = |metrics: Value| {
            Message::new(Kind::Update, 2).with_meta(NUM_SAMPLES, 5).with_meta(METRICS, metrics)
        };
        let too_many: serde_json::Map<String, Value> =
            (0..=MAX_METRICS).map(|i| (format!("m{i}"), Value::from(1.0))).collect();
        for (bad, why) in [
            (Value::Object(too_many), "more than 256"),
            (serde_json::json!({"loss": "low"}), "not a finite number"),
            (serde_json::json!({"": 1.0}), "metric name"),
            (serde_json::json!({"x".repeat(129): 1.0}), "metric name"),
            (serde_json::json!([1.0]), "not an object"),
        ] {
            let err = Update::decode(&peer, &with_metrics(bad)).unwrap_err().to_string();
            assert!(err.contains("t9") && err.contains(why), "{why}: {err}");
        }
    }
}
