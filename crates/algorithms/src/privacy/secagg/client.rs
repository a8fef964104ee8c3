//! The client's state machine.

use std::collections::{BTreeMap, BTreeSet};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use x25519_dalek::{PublicKey, StaticSecret};

use super::crypto::{self, CHUNK, LABEL_ENC, LABEL_MASK, Mask, Word};
use super::messages::{
    AdvertiseKeys, CIPHERTEXT_LEN, ClientBody, ClientMessage, EncryptedShares, MaskedInput,
    PLAINTEXT_LEN, ServerBody, ServerMessage, Setup, UnmaskShares, read_share, write_share,
};
use super::shamir::{self, SHARE_LEN, ShareValue};
use super::{Quantizer, SecAggConfig, SecAggError, graph};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitKeys,
    AwaitShares,
    AwaitUnmask,
    Done,
}

impl State {
    fn expecting(self) -> &'static str {
        match self {
            State::AwaitKeys => "waiting for the neighbours' keys",
            State::AwaitShares => "waiting for the neighbours' shares",
            State::AwaitUnmask => "waiting for the unmask request",
            State::Done => "done with the round",
        }
    }
}

struct Peer {
    enc_pk: PublicKey,
    mask_pk: PublicKey,
}

/// One client's side of a SecAgg+ round.
///
/// ```text
/// let (mut client, keys) = SecAggClient::new(&config, &setup_message)?;   // send keys
/// let shares = client.handle_keys(&keys_message)?;                        // send shares
/// let input = client.handle_shares(&delivery, &update, num_samples)?;     // send input
/// let reveal = client.handle_unmask(&unmask_request)?;                    // send, done
/// ```
///
/// Every handler checks the whole message before it changes anything: on an error the client
/// stays in its stage (and can take a correct message), and nothing secret has left it.
pub struct SecAggClient {
    round: u64,
    setup: Setup,
    state: State,
    rng: ChaCha20Rng,
    enc_sk: StaticSecret,
    mask_sk: StaticSecret,
    neighbours: BTreeSet<u32>,
    peers: BTreeMap<u32, Peer>,
    self_seed: [u8; 32],
    /// Shares held, by owner: (self-mask seed share, mask key share). Includes its own.
    held: BTreeMap<u32, (ShareValue, ShareValue)>,
    /// Neighbours whose pairwise masks are in the input.
    masked_with: BTreeSet<u32>,
}

impl std::fmt::Debug for SecAggClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggClient")
            .field("index", &self.setup.index)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl SecAggClient {
    /// Joins the round the server's setup message describes, checking it against this
    /// client's own config; returns the client and its key advertisement. Randomness comes
    /// from an OS-seeded ChaCha20.
    pub fn new(
        config: &SecAggConfig,
        setup: &ServerMessage,
    ) -> Result<(Self, ClientMessage), SecAggError> {
        Self::with_rng(config, setup, ChaCha20Rng::from_os_rng())
    }

    /// [`SecAggClient::new`] with a fixed seed: for tests and benchmarks only (the masks are
    /// then predictable and hide nothing).
    pub fn with_seed(
        config: &SecAggConfig,
        setup: &ServerMessage,
        seed: u64,
    ) -> Result<(Self, ClientMessage), SecAggError> {
        Self::with_rng(config, setup, ChaCha20Rng::seed_from_u64(seed))
    }

    fn with_rng(
        config: &SecAggConfig,
        msg: &ServerMessage,
        mut rng: ChaCha20Rng,
    ) -> Result<(Self, ClientMessage), SecAggError> {
        let ServerBody::Setup(setup) = &msg.body else {
            return Err(SecAggError::UnexpectedMessage {
                who: "server".into(),
                expected: "waiting for the round's setup".into(),
                got: msg.body.name(),
            });
        };
        let invalid = |reason: String| SecAggError::Invalid { who: "server".into(), reason };
        // The server may not weaken this client's own settings.
        let mine = config.round_setup(setup.num_clients, setup.num_params, setup.graph_seed)?;
        let expected = Setup { index: setup.index, ..mine };
        if *setup != expected {
            return Err(invalid(format!(
                "setup differs from this client's secureAggregation config: got {setup:?}, expected {expected:?}"
            )));
        }
        if setup.index >= setup.num_clients {
            return Err(invalid(format!(
                "index {} is outside the round's {} clients",
                setup.index, setup.num_clients
            )));
        }
        let mut secret = || {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            b
        };
        let enc_sk = crypto::secret_from(secret());
        let mask_sk = crypto::secret_from(secret());
        let self_seed = secret();
        let neighbours = graph::neighbours_of(
            setup.num_clients,
            setup.neighbors,
            &setup.graph_seed,
            setup.index,
        )
        .into_iter()
        .collect();
        let keys = AdvertiseKeys {
            enc_pk: PublicKey::from(&enc_sk).to_bytes(),
            mask_pk: PublicKey::from(&mask_sk).to_bytes(),
        };
        let client = Self {
            round: msg.round,
            setup: setup.clone(),
            state: State::AwaitKeys,
            rng,
            enc_sk,
            mask_sk,
            neighbours,
            peers: BTreeMap::new(),
            self_seed,
            held: BTreeMap::new(),
            masked_with: BTreeSet::new(),
        };
        Ok((client, ClientMessage { round: msg.round, body: ClientBody::Keys(keys) }))
    }

    /// This client's index in the round.
    pub fn index(&self) -> u32 {
        self.setup.index
    }

    /// The round.
    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    fn invalid(&self, reason: String) -> SecAggError {
        SecAggError::Invalid { who: "server".into(), reason }
    }

    fn check(&self, msg: &ServerMessage, state: State) -> Result<(), SecAggError> {
        if msg.round != self.round {
            return Err(SecAggError::WrongRound {
                who: "server".into(),
                expected: self.round,
                got: msg.round,
            });
        }
        if self.state != state {
            return Err(SecAggError::UnexpectedMessage {
                who: "server".into(),
                expected: self.state.expecting().into(),
                got: msg.body.name(),
            });
        }
        Ok(())
    }

    fn below(&self, stage: &'static str, got: usize, detail: &str) -> Result<(), SecAggError> {
        let t = self.setup.threshold as usize;
        if got < t {
            return Err(SecAggError::BelowThreshold {
                stage,
                got,
                threshold: t,
                detail: detail.into(),
            });
        }
        Ok(())
    }

    /// Stage 1 → 2: takes the neighbours' public keys; returns this client's encrypted shares.
    pub fn handle_keys(&mut self, msg: &ServerMessage) -> Result<ClientMessage, SecAggError> {
        self.check(msg, State::AwaitKeys)?;
        let ServerBody::Keys(keys) = &msg.body else {
            return Err(SecAggError::UnexpectedMessage {
                who: "server".into(),
                expected: self.state.expecting().into(),
                got: msg.body.name(),
            });
        };
        let me = self.setup.index;
        let mut peers = BTreeMap::new();
        let mut seen_keys = BTreeSet::new();
        seen_keys.insert(PublicKey::from(&self.enc_sk).to_bytes());
        seen_keys.insert(PublicKey::from(&self.mask_sk).to_bytes());
        for k in keys {
            if !self.neighbours.contains(&k.index) {
                return Err(self.invalid(format!(
                    "keys broadcast lists client {}, not a neighbour of client {me}",
                    k.index
                )));
            }
            if !seen_keys.insert(k.enc_pk) || !seen_keys.insert(k.mask_pk) {
                return Err(self.invalid(format!(
                    "keys broadcast repeats a public key (at client {})",
                    k.index
                )));
            }
            let peer =
                Peer { enc_pk: PublicKey::from(k.enc_pk), mask_pk: PublicKey::from(k.mask_pk) };
            if crypto::agree(&self.enc_sk, &peer.enc_pk).is_none()
                || crypto::agree(&self.mask_sk, &peer.mask_pk).is_none()
            {
                return Err(SecAggError::Invalid {
                    who: super::client_name(k.index),
                    reason: "advertised a low-order X25519 public key".into(),
                });
            }
            if peers.insert(k.index, peer).is_some() {
                return Err(self.invalid(format!("keys broadcast lists client {} twice", k.index)));
            }
        }
        self.below(
            "share keys",
            peers.len() + 1,
            "this client and its neighbours that advertised keys",
        )?;

        let t = self.setup.threshold as usize;
        let holders: Vec<u32> = peers.keys().copied().chain(std::iter::once(me)).collect();
        let b_shares = shamir::split(&self.self_seed, &holders, t, &mut self.rng);
        let sk_shares = shamir::split(&self.mask_sk.to_bytes(), &holders, t, &mut self.rng);
        let mut out = Vec::with_capacity(peers.len());
        let mut held = BTreeMap::new();
        for ((&holder, b), sk) in holders.iter().zip(&b_shares).zip(&sk_shares) {
            if holder == me {
                held.insert(me, (*b, *sk));
                continue;
            }
            let peer = &peers[&holder];
            let Some(dh) = crypto::agree(&self.enc_sk, &peer.enc_pk) else { continue };
            let key = crypto::pair_key(LABEL_ENC, &dh, self.round, me, holder);
            let mut plain = Vec::with_capacity(PLAINTEXT_LEN);
            plain.extend_from_slice(&me.to_le_bytes());
            plain.extend_from_slice(&holder.to_le_bytes());
            write_share(&mut plain, b);
            write_share(&mut plain, sk);
            out.push((holder, crypto::seal(&key, self.round, me, holder, &plain)));
        }
        let commitment = crypto::commit(&self.self_seed, self.round, me);
        self.peers = peers;
        self.held = held;
        self.state = State::AwaitShares;
        Ok(ClientMessage {
            round: self.round,
            body: ClientBody::Shares(EncryptedShares { commitment, shares: out }),
        })
    }

    /// Stage 2 → 3: takes the shares the neighbours sent this client, and masks `update`
    /// (weighted by `num_samples`, clipped to `maxWeight`); returns the masked input.
    pub fn handle_shares(
        &mut self,
        msg: &ServerMessage,
        update: &[f32],
        num_samples: u64,
    ) -> Result<ClientMessage, SecAggError> {
        self.check(msg, State::AwaitShares)?;
        let ServerBody::Shares(delivery) = &msg.body else {
            return Err(SecAggError::UnexpectedMessage {
                who: "server".into(),
                expected: self.state.expecting().into(),
                got: msg.body.name(),
            });
        };
        if update.len() as u64 != self.setup.num_params {
            return Err(SecAggError::Input(format!(
                "the update has {} values, the round aggregates {}",
                update.len(),
                self.setup.num_params
            )));
        }
        if let Some((i, v)) = update.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(SecAggError::Input(format!("element {i} is not finite ({v})")));
        }
        let me = self.setup.index;
        let mut received = BTreeMap::new();
        for (from, ct) in &delivery.shares {
            let who = super::client_name(*from);
            let Some(peer) = self.peers.get(from) else {
                return Err(self.invalid(format!("shares delivery has a box from {who}, which did not advertise keys to this client")));
            };
            if received.contains_key(from) {
                return Err(self.invalid(format!("shares delivery has two boxes from {who}")));
            }
            if ct.len() != CIPHERTEXT_LEN {
                return Err(SecAggError::Invalid {
                    who,
                    reason: format!("share box of {} bytes, expected {CIPHERTEXT_LEN}", ct.len()),
                });
            }
            let plain = crypto::agree(&self.enc_sk, &peer.enc_pk)
                .and_then(|dh| {
                    let key = crypto::pair_key(LABEL_ENC, &dh, self.round, *from, me);
                    crypto::open(&key, self.round, *from, me, ct)
                })
                .ok_or_else(|| SecAggError::Invalid {
                    who: who.clone(),
                    reason:
                        "its share box failed authentication (tampered, or not for this client)"
                            .into(),
                })?;
            let id = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if plain.len() != PLAINTEXT_LEN || id(&plain[..4]) != *from || id(&plain[4..8]) != me {
                return Err(SecAggError::Invalid {
                    who,
                    reason: "its share box names another sender or recipient".into(),
                });
            }
            let b = read_share(&plain[8..8 + SHARE_LEN]);
            let sk = read_share(&plain[8 + SHARE_LEN..]);
            let (Some(b), Some(sk)) = (b, sk) else {
                return Err(SecAggError::Invalid {
                    who,
                    reason: "its shares are not field elements".into(),
                });
            };
            received.insert(*from, (b, sk));
        }
        self.below(
            "masked input",
            received.len() + 1,
            "this client and its neighbours whose shares arrived",
        )?;

        let data = match self.setup.ring_bits {
            32 => self.mask::<u32>(update, num_samples, &received),
            _ => self.mask::<u64>(update, num_samples, &received),
        };
        self.masked_with = received.keys().copied().collect();
        self.held.extend(received);
        self.state = State::AwaitUnmask;
        Ok(ClientMessage {
            round: self.round,
            body: ClientBody::Input(MaskedInput { ring_bits: self.setup.ring_bits, data }),
        })
    }

    fn mask<W: Word>(
        &mut self,
        update: &[f32],
        num_samples: u64,
        masked_with: &BTreeMap<u32, (ShareValue, ShareValue)>,
    ) -> Vec<u8> {
        let q = Quantizer::new(&self.setup);
        let weight = match self.setup.max_weight {
            0 => 1,
            w => num_samples.min(w),
        };
        let me = self.setup.index;
        let mut masks: Vec<Mask> = vec![(self.self_seed, false)];
        for j in masked_with.keys() {
            if let Some(dh) = crypto::agree(&self.mask_sk, &self.peers[j].mask_pk) {
                masks.push((crypto::pair_key(LABEL_MASK, &dh, self.round, me, *j), me > *j));
            }
        }
        // Stochastic rounding draws from one ChaCha20 stream per chunk, keyed by this client.
        let mut rounding_key = [0u8; 32];
        self.rng.fill_bytes(&mut rounding_key);
        let len = update.len() + 1;
        let mut out = vec![0u8; len * W::BYTES];
        out.par_chunks_mut(CHUNK * W::BYTES).enumerate().for_each(|(c, bytes)| {
            let start = c * CHUNK;
            let mut rounding = ChaCha20Rng::from_seed(rounding_key);
            rounding.set_stream(c as u64);
            let mut words: Vec<W> = (start..start + bytes.len() / W::BYTES)
                .map(|k| match update.get(k) {
                    Some(x) => W::from_u64(q.quantize(*x, &mut rounding).wrapping_mul(weight)),
                    None => W::from_u64(weight), // the last element: the weight itself
                })
                .collect();
            crypto::apply_masks_at(&mut words, start, &masks);
            for (w, o) in words.iter().zip(bytes.chunks_exact_mut(W::BYTES)) {
                w.put_le(o);
            }
        });
        out
    }

    /// Stage 3 → 4: reveals, for each neighbour the server says dropped, the share of its
    /// mask key, and for each survivor (this client included) the share of its self-mask
    /// seed; never both for one neighbour. Ends this client's part of the round.
    pub fn handle_unmask(&mut self, msg: &ServerMessage) -> Result<ClientMessage, SecAggError> {
        self.check(msg, State::AwaitUnmask)?;
        let ServerBody::Unmask(req) = &msg.body else {
            return Err(SecAggError::UnexpectedMessage {
                who: "server".into(),
                expected: self.state.expecting().into(),
                got: msg.body.name(),
            });
        };
        let me = self.setup.index;
        let dropped: BTreeSet<u32> = req.dropped.iter().copied().collect();
        let survivors: BTreeSet<u32> = req.survivors.iter().copied().collect();
        if dropped.len() != req.dropped.len() || survivors.len() != req.survivors.len() {
            return Err(self.invalid("unmask request repeats a client".into()));
        }
        if let Some(both) = dropped.intersection(&survivors).next() {
            return Err(self.invalid(format!(
                "unmask request lists client {both} as both dropped and surviving (would reveal its update)"
            )));
        }
        if !survivors.contains(&me) {
            return Err(self.invalid(format!(
                "unmask request does not list client {me} itself as a survivor"
            )));
        }
        let mut expected: BTreeSet<u32> = self.masked_with.clone();
        expected.insert(me);
        let listed: BTreeSet<u32> = dropped.union(&survivors).copied().collect();
        if listed != expected {
            return Err(self.invalid(format!(
                "unmask request must classify exactly this client and the neighbours it masked with {:?}, got {:?}",
                expected, listed
            )));
        }
        self.below(
            "unmask",
            survivors.len(),
            "this client and its neighbours whose masked input arrived",
        )?;
        let mask_key_shares = dropped.iter().map(|j| (*j, self.held[j].1)).collect();
        let self_mask_shares = survivors.iter().map(|j| (*j, self.held[j].0)).collect();
        self.state = State::Done;
        self.held.clear();
        Ok(ClientMessage {
            round: self.round,
            body: ClientBody::Unmask(UnmaskShares { mask_key_shares, self_mask_shares }),
        })
    }
}
