//! Dashboard sessions: an opaque random id in an `HttpOnly`, `SameSite=Strict` cookie, mapped
//! in memory to the hash of the token the user logged in with.
//!
//! The cookie never holds the token (nor its hash): a stolen cookie dies with its session
//! (logout, expiry, apiserver restart), and every request checks the token again through the
//! store, so a revoked or expired token ends its sessions at once. Only the SHA-256 of a
//! session id is kept, as for tokens. The table is bounded: past [`MAX_SESSIONS`] the expired
//! ones are dropped, then the oldest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::http::header::COOKIE;

use crate::api::auth::{new_secret, secret_hash};

/// The cookie's name.
pub const COOKIE_NAME: &str = "fledge_session";
/// How long a session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once.
pub const MAX_SESSIONS: usize = 10_000;

#[derive(Clone, Debug)]
struct Session {
    token_sha256: String,
    created: Instant,
}

/// The sessions of one apiserver. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, Session>>>,
}

impl Sessions {
    /// Opens a session for the token whose hash is `token_sha256`; returns its id (the
    /// cookie's value).
    pub fn open(&self, token_sha256: &str) -> String {
        let id = new_secret();
        let mut map = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.created.elapsed() < SESSION_TTL);
        }
        if map.len() >= MAX_SESSIONS {
            let oldest = map.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        map.insert(
            secret_hash(&id),
            Session { token_sha256: token_sha256.to_owned(), created: Instant::now() },
        );
        id
    }

    /// The token hash of session `id`, if it is open and not expired.
    pub fn token_of(&self, id: &str) -> Option<String> {
        let key = secret_hash(id);
        let mut map = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(&key) {
            Some(s) if s.created.elapsed() < SESSION_TTL => Some(s.token_sha256.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Closes session `id` (logout).
    pub fn close(&self, id: &str) {
        let mut map = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.remove(&secret_hash(id));
    }

    /// How many sessions are open (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id the request's cookie carries: 64 hex digits, nothing else.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value that stores session `id` (`Secure` when served over TLS).
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE_NAME}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that clears the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE_NAME}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_open_resolve_and_close() {
        let sessions = Sessions::default();
        let id = sessions.open("hash-a");
        assert_eq!(id.len(), 64);
        assert_eq!(sessions.token_of(&id).as_deref(), Some("hash-a"));
        assert_eq!(sessions.token_of(&new_secret()), None, "an unknown id is no session");
        sessions.close(&id);
        assert_eq!(sessions.token_of(&id), None, "closed");
    }

    #[test]
    fn the_table_is_bounded() {
        let sessions = Sessions::default();
        let first = sessions.open("first");
        for _ in 0..MAX_SESSIONS {
            sessions.open("other");
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert_eq!(sessions.token_of(&first), None, "the oldest went first");
    }

    #[test]
    fn only_a_well_formed_cookie_is_read() {
        let id = "ab".repeat(32);
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, format!("other=1; {COOKIE_NAME}={id}").parse().unwrap());
        assert_eq!(cookie(&headers), Some(id.as_str()));
        for bad in [format!("{COOKIE_NAME}=abc"), format!("{COOKIE_NAME}={}zz", "a".repeat(62))] {
            let mut headers = HeaderMap::new();
            headers.insert(COOKIE, bad.parse().unwrap());
            assert_eq!(cookie(&headers), None, "{bad}");
        }
        let set = set_cookie(&id, true);
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Secure")
        );
        assert!(!set_cookie(&id, false).contains("Secure"));
        assert!(clear_cookie(true).contains("Max-Age=0"));
    }
}
