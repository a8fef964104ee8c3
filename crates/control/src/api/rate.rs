//! Per-task token buckets: how fast a task may post what it reports (metric records).
//!
//! A bucket holds up to `per_minute` tokens and refills at `per_minute / 60` a second; a request
//! takes one token per record, all or none. A task may so post a minute's worth at once after a
//! quiet minute, and `per_minute` a minute on average. The clock is explicit (tests drive it).
//! Buckets that are full again carry no information and are dropped once the map grows, so it
//! holds at most the tasks that posted within the last minute or so (tasks are authenticated
//! before they reach a bucket).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use fledge_types::TaskId;

/// Buckets held before full ones are dropped.
const PRUNE_ABOVE: usize = 1024;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Why a request may not take its tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Refused {
    /// Not now: enough tokens are back after this long.
    Wait(Duration),
    /// Never: the request wants more than a full bucket holds.
    TooMany,
}

/// Token buckets by task.
#[derive(Debug, Default)]
pub(super) struct RateLimiter {
    buckets: Mutex<HashMap<TaskId, Bucket>>,
}

impl RateLimiter {
    /// Takes `n` tokens from `task`'s bucket of `per_minute` at `now`, or says why not (taking
    /// nothing then).
    pub(super) fn take(
        &self,
        task: &TaskId,
        n: u64,
        per_minute: u32,
        now: Instant,
    ) -> Result<(), Refused> {
        let capacity = f64::from(per_minute);
        let per_sec = capacity / 60.0;
        let wanted = n as f64;
        if wanted > capacity {
            return Err(Refused::TooMany);
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let refill = |b: &Bucket| {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            (b.tokens + elapsed * per_sec).min(capacity)
        };
        if buckets.len() >= PRUNE_ABOVE && !buckets.contains_key(task) {
            buckets.retain(|_, b| refill(b) < capacity);
        }
        let bucket = buckets.entry(task.clone()).or_insert(Bucket { tokens: capacity, at: now });
        let tokens = refill(bucket);
        if tokens < wanted {
            let wait = Duration::from_secs_f64((wanted - tokens) / per_sec);
            return Err(Refused::Wait(wait.max(Duration::from_millis(1))));
        }
        *bucket = Bucket { tokens: tokens - wanted, at: now };
        Ok(())
    }

    /// Buckets held (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_then_its_rate() {
        let limiter = RateLimiter::default();
        let (t, other) = (TaskId::new("t"), TaskId::new("u"));
        let t0 = Instant::now();
        limiter.take(&t, 50, 60, t0).expect("a full bucket");
        limiter.take(&t, 10, 60, t0).expect("the rest of it");
        let Err(Refused::Wait(wait)) = limiter.take(&t, 2, 60, t0) else {
            panic!("empty");
        };
        assert_eq!(wait, Duration::from_secs(2), "one token a second at 60 a minute");
        limiter.take(&other, 60, 60, t0).expect("each task has its own bucket");
        limiter.take(&t, 2, 60, t0 + Duration::from_secs(2)).expect("refilled");
        assert_eq!(limiter.take(&t, 61, 60, t0 + Duration::from_secs(600)), Err(Refused::TooMany));
        limiter.take(&t, 60, 60, t0 + Duration::from_secs(600)).expect("full again, not more");
        assert!(limiter.take(&t, 1, 60, t0 + Duration::from_secs(600)).is_err());
    }

    #[test]
    fn full_buckets_are_dropped_once_there_are_many() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        for i in 0..PRUNE_ABOVE {
            limiter.take(&TaskId::new(format!("t{i}")), 1, 60, t0).expect("room");
        }
        assert_eq!(limiter.len(), PRUNE_ABOVE);
        let later = t0 + Duration::from_secs(60);
        limiter.take(&TaskId::new("new"), 1, 60, later).expect("room");
        assert_eq!(limiter.len(), 1, "every other bucket was full again");
    }
}
