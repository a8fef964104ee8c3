//! The server's state machine.

use std::collections::{BTreeMap, BTreeSet};

use rand::TryRngCore;
use rand::rngs::OsRng;
use rayon::prelude::*;
use x25519_dalek::{PublicKey, StaticSecret};

use super::crypto::{self, LABEL_MASK, Mask, Word};
use super::messages::{
    CIPHERTEXT_LEN, ClientBody, ClientMessage, PeerKeys, ServerBody, ServerMessage, Setup,
    SharesDelivery, UnmaskRequest, UnmaskShares,
};
use super::shamir::{self, ShareValue};
use super::{Quantizer, SecAggConfig, SecAggError, client_name, graph};

/// Where the server is in the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Collecting public keys (stage 1).
    Keys,
    /// Collecting encrypted shares (stage 2).
    Shares,
    /// Collecting masked inputs (stage 3).
    Input,
    /// Collecting unmask shares (stage 4); [`SecAggServer::finish`] ends the round.
    Unmask,
    /// The round produced its aggregate.
    Done,
    /// The round was aborted (below threshold).
    Failed,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Keys => "collecting keys",
            Stage::Shares => "collecting encrypted shares",
            Stage::Input => "collecting masked inputs",
            Stage::Unmask => "collecting unmask shares",
            Stage::Done => "done",
            Stage::Failed => "aborted",
        }
    }
}

/// The outcome of a round: the weighted mean of the survivors' updates.
#[derive(Debug, Clone, PartialEq)]
pub struct SecAggResult {
    /// `Σ wᵢ·xᵢ / Σ wᵢ` over the clients whose masked input arrived, within one quantisation
    /// step (for values inside the clipping range).
    pub mean: Vec<f32>,
    /// `Σ wᵢ`.
    pub total_weight: u64,
    /// The clients whose updates are in the mean.
    pub contributors: Vec<u32>,
    /// Clients that sent shares but no masked input (their masks were cancelled).
    pub dropped: Vec<u32>,
    /// The quantisation step `2c / (2^bits − 1)`.
    pub quantization_step: f64,
}

/// A client's self-mask commitment and its boxes `(recipient, ciphertext)`.
type SentShares = ([u8; 32], Vec<(u32, Vec<u8>)>);

enum Acc {
    W32(Vec<u32>),
    W64(Vec<u64>),
}

/// The server's side of a SecAgg+ round: relays keys and shares, sums masked inputs as they
/// arrive (memory O(model), independent of the number of clients) and unmasks the sum.
///
/// ```text
/// let (mut server, setups) = SecAggServer::new(&config, round, n, num_params)?;  // send setups[i] to i
/// for each stage {
///     server.receive(i, &ClientMessage::decode(&bytes)?)?;   // as messages arrive
///     let out = server.close_stage()?;                        // on all-in or timeout: send out
/// }
/// let result = server.finish()?;                              // after the unmask shares
/// ```
///
/// A message that fails a check is an error naming its sender and changes nothing; the
/// sender simply counts as dropped if it sends nothing valid before the stage closes.
pub struct SecAggServer {
    round: u64,
    setup: Setup,
    graph: Vec<Vec<u32>>,
    stage: Stage,
    keys: BTreeMap<u32, (PublicKey, PublicKey)>,
    /// By sender: commitment and boxes `(recipient, ciphertext)`.
    shares: BTreeMap<u32, SentShares>,
    /// For each client that got a delivery: the neighbours it masks with.
    delivered: BTreeMap<u32, BTreeSet<u32>>,
    acc: Acc,
    inputs: BTreeSet<u32>,
    requests: BTreeMap<u32, (BTreeSet<u32>, BTreeSet<u32>)>,
    reveals: BTreeMap<u32, UnmaskShares>,
}

impl std::fmt::Debug for SecAggServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggServer")
            .field("round", &self.round)
            .field("stage", &self.stage)
            .field("clients", &self.setup.num_clients)
            .finish_non_exhaustive()
    }
}

impl SecAggServer {
    /// A round of `num_clients` clients aggregating `num_params` values, with a neighbour
    /// graph drawn from the OS's randomness. Returns the setup message for each client index.
    pub fn new(
        config: &SecAggConfig,
        round: u64,
        num_clients: u32,
        num_params: u64,
    ) -> Result<(Self, Vec<ServerMessage>), SecAggError> {
        let mut seed = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut seed)
            .map_err(|e| SecAggError::Input(format!("OS randomness: {e}")))?;
        Self::with_graph_seed(config, round, num_clients, num_params, seed)
    }

    /// [`SecAggServer::new`] with a chosen graph seed (tests, benchmarks).
    pub fn with_graph_seed(
        config: &SecAggConfig,
        round: u64,
        num_clients: u32,
        num_params: u64,
        graph_seed: [u8; 32],
    ) -> Result<(Self, Vec<ServerMessage>), SecAggError> {
        let setup = config.round_setup(num_clients, num_params, graph_seed)?;
        let graph = graph::neighbours(num_clients, setup.neighbors, &graph_seed);
        let len = usize::try_from(num_params + 1).map_err(|_| {
            SecAggError::Input(format!("{num_params} parameters do not fit in memory"))
        })?;
        let acc =
            if setup.ring_bits == 32 { Acc::W32(vec![0; len]) } else { Acc::W64(vec![0; len]) };
        let setups = (0..num_clients)
            .map(|index| ServerMessage {
                round,
                body: ServerBody::Setup(Setup { index, ..setup.clone() }),
            })
            .collect();
        let server = Self {
            round,
            setup,
            graph,
            stage: Stage::Keys,
            keys: BTreeMap::new(),
            shares: BTreeMap::new(),
            delivered: BTreeMap::new(),
            acc,
            inputs: BTreeSet::new(),
            requests: BTreeMap::new(),
            reveals: BTreeMap::new(),
        };
        Ok((server, setups))
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The round's parameters (as sent to client 0).
    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// The neighbours of each client.
    pub fn neighbours(&self, client: u32) -> &[u32] {
        self.graph.get(client as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Clients the current stage still waits for (those that took part in the previous one
    /// and have not sent a valid message yet).
    pub fn pending(&self) -> Vec<u32> {
        (0..self.setup.num_clients).filter(|i| self.is_pending(*i)).collect()
    }

    fn is_pending(&self, i: u32) -> bool {
        match self.stage {
            Stage::Keys => i < self.setup.num_clients && !self.keys.contains_key(&i),
            Stage::Shares => self.keys.contains_key(&i) && !self.shares.contains_key(&i),
            Stage::Input => self.delivered.contains_key(&i) && !self.inputs.contains(&i),
            Stage::Unmask => self.requests.contains_key(&i) && !self.reveals.contains_key(&i),
            Stage::Done | Stage::Failed => false,
        }
    }

    fn invalid(from: u32, reason: impl Into<String>) -> SecAggError {
        SecAggError::Invalid { who: client_name(from), reason: reason.into() }
    }

    /// Takes one client's message for the current stage. Every check runs first: an invalid
    /// message (wrong stage or round, a client that is not in the stage, a repeat, wrong
    /// lengths, recipients outside its neighbourhood, …) is an error naming the client and
    /// leaves the round unchanged.
    pub fn receive(&mut self, from: u32, msg: &ClientMessage) -> Result<(), SecAggError> {
        if msg.round != self.round {
            return Err(SecAggError::WrongRound {
                who: client_name(from),
                expected: self.round,
                got: msg.round,
            });
        }
        if from >= self.setup.num_clients {
            return Err(Self::invalid(
                from,
                format!("not one of the round's {} clients", self.setup.num_clients),
            ));
        }
        let unexpected = || SecAggError::UnexpectedMessage {
            who: client_name(from),
            expected: format!("the server is {}", self.stage.name()),
            got: msg.body.name(),
        };
        if !self.is_pending(from) {
            return match (self.stage, &msg.body) {
                (Stage::Keys, ClientBody::Keys(_))
                | (Stage::Shares, ClientBody::Shares(_))
                | (Stage::Input, ClientBody::Input(_))
                | (Stage::Unmask, ClientBody::Unmask(_)) => Err(Self::invalid(
                    from,
                    format!(
                        "sent a {} it may not send now (already sent, or not in this stage)",
                        msg.body.name()
                    ),
                )),
                _ => Err(unexpected()),
            };
        }
        match (self.stage, &msg.body) {
            (Stage::Keys, ClientBody::Keys(k)) => {
                if k.enc_pk == k.mask_pk {
                    return Err(Self::invalid(from, "advertised the same key twice"));
                }
                self.keys.insert(from, (PublicKey::from(k.enc_pk), PublicKey::from(k.mask_pk)));
            }
            (Stage::Shares, ClientBody::Shares(s)) => {
                let expected: BTreeSet<u32> = self.graph[from as usize]
                    .iter()
                    .copied()
                    .filter(|j| self.keys.contains_key(j))
                    .collect();
                let mut got = BTreeSet::new();
                for (to, ct) in &s.shares {
                    if !expected.contains(to) {
                        return Err(Self::invalid(
                            from,
                            format!(
                                "sent a share to client {to}, not a neighbour that advertised keys"
                            ),
                        ));
                    }
                    if !got.insert(*to) {
                        return Err(Self::invalid(from, format!("sent two shares to client {to}")));
                    }
                    if ct.len() != CIPHERTEXT_LEN {
                        return Err(Self::invalid(
                            from,
                            format!("share box of {} bytes, expected {CIPHERTEXT_LEN}", ct.len()),
                        ));
                    }
                }
                if got != expected {
                    return Err(Self::invalid(
                        from,
                        format!("sent shares to {got:?}, expected one for each of {expected:?}"),
                    ));
                }
                self.shares.insert(from, (s.commitment, s.shares.clone()));
            }
            (Stage::Input, ClientBody::Input(m)) => {
                let width = usize::from(self.setup.ring_bits) / 8;
                let expected = (self.setup.num_params as usize + 1) * width;
                if m.ring_bits != self.setup.ring_bits || m.data.len() != expected {
                    return Err(Self::invalid(
                        from,
                        format!(
                            "masked input of {} bytes in a {}-bit ring, expected {expected} bytes in a {}-bit ring",
                            m.data.len(),
                            m.ring_bits,
                            self.setup.ring_bits
                        ),
                    ));
                }
                match &mut self.acc {
                    Acc::W32(acc) => fold(acc, &m.data),
                    Acc::W64(acc) => fold(acc, &m.data),
                }
                self.inputs.insert(from);
            }
            (Stage::Unmask, ClientBody::Unmask(u)) => {
                let (dropped, survivors) = &self.requests[&from];
                let owners =
                    |l: &[(u32, ShareValue)]| l.iter().map(|(o, _)| *o).collect::<BTreeSet<u32>>();
                if owners(&u.mask_key_shares) != *dropped
                    || u.mask_key_shares.len() != dropped.len()
                {
                    return Err(Self::invalid(
                        from,
                        "revealed mask-key shares for other clients than the dropped ones it was asked for",
                    ));
                }
                if owners(&u.self_mask_shares) != *survivors
                    || u.self_mask_shares.len() != survivors.len()
                {
                    return Err(Self::invalid(
                        from,
                        "revealed self-mask shares for other clients than the survivors it was asked for",
                    ));
                }
                if u.mask_key_shares
                    .iter()
                    .chain(&u.self_mask_shares)
                    .any(|(_, s)| !shamir::is_valid(s))
                {
                    return Err(Self::invalid(
                        from,
                        "revealed a share that is not a field element",
                    ));
                }
                self.reveals.insert(from, u.clone());
            }
            _ => return Err(unexpected()),
        }
        Ok(())
    }

    fn fail_below(&mut self, stage: &'static str, got: usize, detail: String) -> SecAggError {
        self.stage = Stage::Failed;
        SecAggError::BelowThreshold { stage, got, threshold: self.setup.threshold as usize, detail }
    }

    /// Ends the current stage (everyone pending is now dropped) and returns the messages of
    /// the next one, `(client, message)`. Below the threshold the round is aborted with
    /// [`SecAggError::BelowThreshold`] before any share is asked for. The unmask stage ends
    /// with [`SecAggServer::finish`] instead.
    pub fn close_stage(&mut self) -> Result<Vec<(u32, ServerMessage)>, SecAggError> {
        let t = self.setup.threshold as usize;
        let round = self.round;
        match self.stage {
            Stage::Keys => {
                if self.keys.len() < t {
                    return Err(self.fail_below(
                        "advertise keys",
                        self.keys.len(),
                        "clients that advertised keys".into(),
                    ));
                }
                let out = self
                    .keys
                    .keys()
                    .map(|&i| {
                        let keys = self.graph[i as usize]
                            .iter()
                            .filter_map(|j| {
                                self.keys.get(j).map(|(e, m)| PeerKeys {
                                    index: *j,
                                    enc_pk: e.to_bytes(),
                                    mask_pk: m.to_bytes(),
                                })
                            })
                            .collect();
                        (i, ServerMessage { round, body: ServerBody::Keys(keys) })
                    })
                    .collect();
                self.stage = Stage::Shares;
                Ok(out)
            }
            Stage::Shares => {
                if self.shares.len() < t {
                    return Err(self.fail_below(
                        "share keys",
                        self.shares.len(),
                        "clients that sent their shares".into(),
                    ));
                }
                let mut boxes: BTreeMap<u32, Vec<(u32, Vec<u8>)>> =
                    self.shares.keys().map(|i| (*i, Vec::new())).collect();
                for (from, (_, list)) in &self.shares {
                    for (to, ct) in list {
                        if let Some(inbox) = boxes.get_mut(to) {
                            inbox.push((*from, ct.clone()));
                        }
                    }
                }
                self.delivered = boxes
                    .iter()
                    .map(|(i, inbox)| (*i, inbox.iter().map(|(f, _)| *f).collect()))
                    .collect();
                self.stage = Stage::Input;
                Ok(boxes
                    .into_iter()
                    .map(|(i, shares)| {
                        (
                            i,
                            ServerMessage {
                                round,
                                body: ServerBody::Shares(SharesDelivery { shares }),
                            },
                        )
                    })
                    .collect())
            }
            Stage::Input => {
                if self.inputs.len() < t {
                    return Err(self.fail_below(
                        "masked input",
                        self.inputs.len(),
                        "clients whose masked input arrived".into(),
                    ));
                }
                let mut out = Vec::with_capacity(self.inputs.len());
                for &i in &self.inputs {
                    let peers = &self.delivered[&i];
                    let dropped: BTreeSet<u32> =
                        peers.iter().copied().filter(|j| !self.inputs.contains(j)).collect();
                    let mut survivors: BTreeSet<u32> =
                        peers.iter().copied().filter(|j| self.inputs.contains(j)).collect();
                    survivors.insert(i);
                    let body = ServerBody::Unmask(UnmaskRequest {
                        dropped: dropped.iter().copied().collect(),
                        survivors: survivors.iter().copied().collect(),
                    });
                    self.requests.insert(i, (dropped, survivors));
                    out.push((i, ServerMessage { round, body }));
                }
                self.stage = Stage::Unmask;
                Ok(out)
            }
            Stage::Unmask => Err(SecAggError::UnexpectedMessage {
                who: "server".into(),
                expected: "the unmask stage ends with finish()".into(),
                got: "close_stage",
            }),
            Stage::Done | Stage::Failed => Err(SecAggError::UnexpectedMessage {
                who: "server".into(),
                expected: format!("the round is {}", self.stage.name()),
                got: "close_stage",
            }),
        }
    }

    /// Ends the round: rebuilds the dropped clients' mask keys and the survivors' self-mask
    /// seeds from the revealed shares, removes their masks and returns the weighted mean.
    /// Fails with [`SecAggError::BelowThreshold`] (naming whose secret lacks shares) when
    /// too few clients answered.
    pub fn finish(&mut self) -> Result<SecAggResult, SecAggError> {
        if self.stage != Stage::Unmask {
            return Err(SecAggError::UnexpectedMessage {
                who: "server".into(),
                expected: format!("the server is {}", self.stage.name()),
                got: "finish",
            });
        }
        let t = self.setup.threshold as usize;
        if self.reveals.len() < t {
            return Err(self.fail_below(
                "unmask",
                self.reveals.len(),
                "clients that revealed their shares".into(),
            ));
        }
        // Shares per owner, from every client that revealed.
        let mut key_shares: BTreeMap<u32, Vec<(u32, ShareValue)>> = BTreeMap::new();
        let mut seed_shares: BTreeMap<u32, Vec<(u32, ShareValue)>> = BTreeMap::new();
        for (holder, r) in &self.reveals {
            for (owner, s) in &r.mask_key_shares {
                key_shares.entry(*owner).or_default().push((*holder, *s));
            }
            for (owner, s) in &r.self_mask_shares {
                seed_shares.entry(*owner).or_default().push((*holder, *s));
            }
        }
        // Every secret needed, rebuilt before the accumulator is touched.
        let dropped: BTreeSet<u32> =
            self.requests.values().flat_map(|(d, _)| d.iter().copied()).collect();
        let mut pair_seeds: Vec<Mask> = Vec::new();
        for j in &dropped {
            let shares = key_shares.remove(j).unwrap_or_default();
            let mask_pk = self.keys[j].1;
            let verify = |b: &[u8; 32]| PublicKey::from(&StaticSecret::from(*b)) == mask_pk;
            let secret = match shamir::combine_verified(&shares, t, verify) {
                Ok(s) => s,
                Err(shamir::CombineError::TooFew { got, .. }) => {
                    return Err(self.fail_below("unmask", got, format!("shares of the mask key of client {j}, which dropped after sending shares")));
                }
                Err(shamir::CombineError::Inconsistent) => {
                    return Err(SecAggError::Invalid {
                        who: format!("the holders of client {j}'s shares"),
                        reason: "no threshold of the revealed mask-key shares matches its public key (a client lied)".into(),
                    });
                }
            };
            let sk = StaticSecret::from(secret);
            for (&i, peers) in &self.delivered {
                if self.inputs.contains(&i) && peers.contains(j) {
                    let Some(dh) = crypto::agree(&sk, &self.keys[&i].1) else {
                        return Err(Self::invalid(i, "advertised a low-order X25519 public key"));
                    };
                    // i added +PRG when i < j and −PRG when i > j; undo it.
                    pair_seeds.push((crypto::pair_key(LABEL_MASK, &dh, self.round, i, *j), i < *j));
                }
            }
        }
        let inputs: Vec<u32> = self.inputs.iter().copied().collect();
        let mut self_seeds = Vec::with_capacity(inputs.len());
        for i in inputs {
            let shares = seed_shares.remove(&i).unwrap_or_default();
            let commitment = self.shares[&i].0;
            let round = self.round;
            let verify = |b: &[u8; 32]| crypto::commit(b, round, i) == commitment;
            match shamir::combine_verified(&shares, t, verify) {
                Ok(s) => self_seeds.push(s),
                Err(shamir::CombineError::TooFew { got, .. }) => {
                    return Err(self.fail_below(
                        "unmask",
                        got,
                        format!("shares of the self-mask seed of client {i}"),
                    ));
                }
                Err(shamir::CombineError::Inconsistent) => {
                    return Err(SecAggError::Invalid {
                        who: format!("the holders of client {i}'s shares"),
                        reason: "no threshold of the revealed self-mask shares matches its commitment (a client lied)".into(),
                    });
                }
            }
        }
        let q = Quantizer::new(&self.setup);
        let (mean, total_weight) = match &mut self.acc {
            Acc::W32(acc) => unmask(acc, &pair_seeds, &self_seeds, &q)?,
            Acc::W64(acc) => unmask(acc, &pair_seeds, &self_seeds, &q)?,
        };
        self.stage = Stage::Done;
        Ok(SecAggResult {
            mean,
            total_weight,
            contributors: self.inputs.iter().copied().collect(),
            dropped: dropped.into_iter().collect(),
            quantization_step: q.step(),
        })
    }
}

fn fold<W: Word>(acc: &mut [W], data: &[u8]) {
    for (a, b) in acc.iter_mut().zip(data.chunks_exact(W::BYTES)) {
        *a = a.wadd(W::from_le(b));
    }
}

fn unmask<W: Word>(
    acc: &mut Vec<W>,
    pair_seeds: &[Mask],
    self_seeds: &[[u8; 32]],
    q: &Quantizer,
) -> Result<(Vec<f32>, u64), SecAggError> {
    let masks: Vec<Mask> =
        pair_seeds.iter().copied().chain(self_seeds.iter().map(|s| (*s, true))).collect();
    crypto::apply_masks(acc, &masks);
    let Some(total) = acc.last().map(|w| w.to_u64()) else {
        return Err(SecAggError::ZeroTotalWeight);
    };
    if total == 0 {
        return Err(SecAggError::ZeroTotalWeight);
    }
    let n = acc.len() - 1;
    let mean = acc[..n].par_iter().map(|s| q.dequantize_mean(s.to_u64(), total)).collect();
    acc.clear();
    acc.shrink_to_fit();
    Ok((mean, total))
}
