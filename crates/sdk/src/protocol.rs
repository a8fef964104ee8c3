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
//!
//! The ring ([`Command::Ready`], [`Command::Members`]), the coordinator ([`Command::Plan`],
//! [`Command::Assign`]) and vertical learning ([`Command::Ids`], [`Command::Align`],
//! [`Command::Abort`], [`Command::Embed`], [`Command::Gradient`]) add their commands; their
//! module docs give the exchanges.
//!
//! Commands are a type of their own ([`Command`]), distinct from the function tags of
//! channels (`crate::roles::tags`), even where a word is the same on the wire (`upload`).
//!
//! Numbers that come from peers are checked here: an impossible value (a model for round 0
//! where a round ≥ 1 is due, a sample count of 0 or beyond 2^53, a non-finite weight) is an
//! [`Error::Protocol`] naming the sender, never an underflow, overflow or panic.

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
}

impl Command {
    const ALL: [Command; 11] = [
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

/// The upload grants a `Weights` message announces (see [`UPLOAD_GRANTS`]).
pub fn upload_grants(message: &Message) -> u64 {
    message.meta.get(UPLOAD_GRANTS).and_then(Value::as_u64).unwrap_or(0)
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
}
