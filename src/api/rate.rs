//! Per-principal rate limits: each principal may make N requests per
//! second on average, in bursts of up to `burst`; `anonymous` callers are
//! limited per client IP address instead. Each bucket is a GCRA cell
//! (governor), one atomic word checked without a lock.
//!
//! The limit comes from `--rate-limit N[/burst]`, or for one principal from
//! the `rate=N/burst` option of its lines in the tokens file. Buckets are
//! kept in maps of bounded size: one per configured principal, and at most
//! `--rate-limit-max-clients` client addresses; a bucket unused for as long
//! as it takes to fill again is the same as a fresh one and is dropped when
//! room is needed. When every tracked address is recent, a new address is
//! refused (429) rather than let past the limit.

use std::cell::RefCell;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::clock::DefaultClock;
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};

use crate::stripe::Striped;

/// A rate: `per_second` requests per second on average, at most `burst`
/// at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second, on average.
    pub per_second: NonZeroU32,
    /// Requests that may come at once after a quiet spell.
    pub burst: NonZeroU32,
}

impl FromStr for Rate {
    type Err = String;

    /// `N` or `N/burst`, both whole numbers from 1.
    fn from_str(text: &str) -> Result<Self, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<NonZeroU32>()
                .map_err(|_| format!("{text:?}: a rate is N or N/burst, whole numbers from 1"))
        };
        let (rate, burst) = match text.split_once('/') {
            Some((rate, burst)) => (number(rate)?, number(burst)?),
            None => {
                let rate = number(text)?;
                (rate, rate)
            }
        };
        Ok(Rate {
            per_second: rate,
            burst,
        })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.per_second, self.burst)
    }
}

impl Rate {
    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }

    /// How long an unused bucket takes to fill up again.
    fn refill(self) -> Duration {
        self.quota().burst_size_replenished_in()
    }
}

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    StateInformationMiddleware,
>;

/// One caller's bucket.
struct Bucket {
    rate: Rate,
    limiter: Limiter,
    /// When it was last used, in ms since the limits were made.
    last_used: AtomicU64,
    /// Set once the bucket has left its map (pruned, replaced, or reset
    /// by a reload): a thread's memo of it is then stale.
    retired: AtomicBool,
}

/// The last principal's bucket a worker thread used, so that a flood from
/// one principal finds its bucket without the map's shared lock.
struct LastBucket {
    limits: u64,
    name: Arc<str>,
    bucket: Arc<Bucket>,
}

thread_local! {
    static LAST_BUCKET: RefCell<Option<LastBucket>> = const { RefCell::new(None) };
}

/// What the `RateLimit-*` headers of an answer say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// `RateLimit-Limit`: the burst.
    pub limit: u32,
    /// `RateLimit-Remaining`: requests left in the burst now.
    pub remaining: u32,
    /// `RateLimit-Reset`: seconds until the bucket is full again.
    pub reset_secs: u64,
}

impl RateState {
    /// Writes the `RateLimit-Limit`, `RateLimit-Remaining` and
    /// `RateLimit-Reset` headers.
    pub fn write_headers(&self, headers: &mut axum::http::HeaderMap) {
        use axum::http::HeaderName;
        static LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
        static REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
        static RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
        headers.insert(LIMIT.clone(), number(u64::from(self.limit)));
        headers.insert(REMAINING.clone(), number(u64::from(self.remaining)));
        headers.insert(RESET.clone(), number(self.reset_secs));
    }
}

/// A header value of `n`: numbers below 1024 (nearly every limit, count
/// and wait) come from a table made once, so a refusal allocates none.
/// The table's values point into one text kept for the life of the
/// process: cloning such a value copies a pointer, where a value of
/// shared bytes would count references on one cache line that every
/// worker thread writes.
pub fn number(n: u64) -> axum::http::HeaderValue {
    use axum::http::HeaderValue;
    const SMALL_MAX: u64 = 1024;
    static SMALL: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let small = SMALL.get_or_init(|| {
        let text: &'static str = Box::leak(
            (0..SMALL_MAX)
                .map(|i| i.to_string())
                .collect::<String>()
                .into_boxed_str(),
        );
        let mut rest = text;
        (0..SMALL_MAX)
            .map(|i| {
                let (digits, after) = rest.split_at(i.to_string().len());
                rest = after;
                HeaderValue::from_static(digits)
            })
            .collect()
    });
    usize::try_from(n)
        .ok()
        .and_then(|i| small.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(n))
}

/// The outcome of one request's check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No limit applies to this caller.
    Unlimited,
    /// Allowed; the answer carries these headers.
    Allowed(RateState),
    /// Refused with 429: retry after `retry_after_secs`.
    Refused {
        /// The headers of the refusal.
        state: RateState,
        /// `Retry-After`, in whole seconds (at least 1).
        retry_after_secs: u64,
    },
}

/// The rate limits of one server.
pub struct RateLimits {
    default: Option<Rate>,
    /// Named callers. Bounded like the addresses: under mutual TLS any
    /// name a trusted CA signs is a principal, not only the tokens file's.
    principals: Buckets<Arc<str>>,
    clients: Buckets<IpAddr>,
    epoch: Instant,
    /// Spread over threads: a flood of refusals counts on every core.
    refused: Striped<AtomicU64>,
    /// Tells these limits' entries in a thread's memo from another's.
    id: u64,
}

/// Buckets by caller, at most `max` of them.
struct Buckets<K> {
    map: DashMap<K, Arc<Bucket>>,
    max: usize,
    /// When the map was last pruned, in ms since the limits were made.
    pruned_at: AtomicU64,
}

impl<K: Eq + std::hash::Hash + Clone> Buckets<K> {
    fn new(max: usize) -> Self {
        Buckets {
            map: DashMap::new(),
            max: max.max(1),
            pruned_at: AtomicU64::new(0),
        }
    }

    /// The bucket of `key`, made if there is room; `None` when the map is
    /// full of recent callers.
    fn get(&self, key: &K, rate: Rate, now: u64) -> Option<Arc<Bucket>> {
        if let Some(b) = self.map.get(key) {
            if b.rate == rate {
                return Some(b.clone());
            }
            b.retired.store(true, Ordering::Release);
        }
        if self.map.len() >= self.max && !self.map.contains_key(key) {
            self.prune(now);
            if self.map.len() >= self.max {
                return None;
            }
        }
        let fresh = Arc::new(bucket(rate));
        self.map.insert(key.clone(), fresh.clone());
        Some(fresh)
    }

    /// Drops the buckets unused for as long as they take to fill again:
    /// they are full, as a fresh one would be. At most once a second, so a
    /// flood of new callers cannot make every request walk the map.
    fn prune(&self, now: u64) {
        let last = self.pruned_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000
            || self
                .pruned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.map.retain(|_, b| {
            let idle = now.saturating_sub(b.last_used.load(Ordering::Relaxed));
            let keep = u128::from(idle) < b.rate.refill().as_millis();
            if !keep {
                b.retired.store(true, Ordering::Release);
            }
            keep
        });
    }
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("default", &self.default)
            .field("principals", &self.principals.map.len())
            .field("clients", &self.clients.map.len())
            .finish()
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits::new(None, 100_000)
    }
}

impl RateLimits {
    /// Limits of `default` for every caller without a rate of its own,
    /// tracking at most `max_clients` client addresses and as many
    /// principals.
    pub fn new(default: Option<Rate>, max_clients: usize) -> Self {
        RateLimits {
            default,
            principals: Buckets::new(max_clients),
            clients: Buckets::new(max_clients),
            epoch: Instant::now(),
            refused: Striped::default(),
            id: {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
        }
    }

    /// Checks one request of principal `name` (rate `own`, from its token
    /// lines), or of an anonymous caller at `client`.
    pub fn check(&self, name: &Arc<str>, own: Option<Rate>, client: Option<IpAddr>) -> Verdict {
        let anonymous = &**name == super::auth::ANONYMOUS;
        let Some(rate) = own.or(self.default) else {
            return Verdict::Unlimited;
        };
        // One clock read serves the bucket's use stamp and the wait.
        let instant = Instant::now();
        let now = self.ms_at(instant);
        if anonymous {
            let ip = client.unwrap_or(IpAddr::from([0, 0, 0, 0]));
            return self.check_found(self.clients.get(&ip, rate, now), rate, instant, now);
        }
        LAST_BUCKET.with(|last| {
            let Ok(mut last) = last.try_borrow_mut() else {
                let found = self.principals.get(name, rate, now);
                return self.check_found(found, rate, instant, now);
            };
            let known = last.as_ref().is_some_and(|l| {
                l.limits == self.id
                    && *l.name == **name
                    && l.bucket.rate == rate
                    && !l.bucket.retired.load(Ordering::Acquire)
            });
            if !known {
                let Some(bucket) = self.principals.get(name, rate, now) else {
                    return self.refuse_untracked(rate);
                };
                *last = Some(LastBucket {
                    limits: self.id,
                    name: name.clone(),
                    bucket,
                });
            }
            match last.as_ref() {
                Some(l) => self.check_bucket(&l.bucket, rate, instant, now),
                None => self.refuse_untracked(rate),
            }
        })
    }

    /// One request against the bucket found for its caller, or a refusal
    /// when none could be tracked.
    fn check_found(
        &self,
        found: Option<Arc<Bucket>>,
        rate: Rate,
        instant: Instant,
        now: u64,
    ) -> Verdict {
        match found {
            Some(bucket) => self.check_bucket(&bucket, rate, instant, now),
            None => self.refuse_untracked(rate),
        }
    }

    /// One request against `bucket`, at `instant` (`now` in ms since the
    /// limits were made).
    fn check_bucket(&self, bucket: &Bucket, rate: Rate, instant: Instant, now: u64) -> Verdict {
        // Written only when the millisecond changes: a flood from one
        // caller would otherwise write this line from every core.
        if bucket.last_used.load(Ordering::Relaxed) != now {
            bucket.last_used.store(now, Ordering::Relaxed);
        }
        let limit = rate.burst.get();
        match bucket.limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Verdict::Allowed(RateState {
                    limit,
                    remaining,
                    reset_secs: refill_secs(rate, limit.saturating_sub(remaining)),
                })
            }
            Err(not_until) => {
                self.refused.mine().fetch_add(1, Ordering::Relaxed);
                let wait = not_until.wait_time_from(instant);
                Verdict::Refused {
                    state: RateState {
                        limit,
                        remaining: 0,
                        reset_secs: refill_secs(rate, limit),
                    },
                    retry_after_secs: ceil_secs(wait).max(1),
                }
            }
        }
    }

    /// Requests refused with 429 so far.
    pub fn refused(&self) -> u64 {
        self.refused.all().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// Client addresses tracked now, and the most that may be.
    pub fn clients(&self) -> (usize, usize) {
        (self.clients.map.len(), self.clients.max)
    }

    /// Principals whose buckets are kept now (at most as many as client
    /// addresses).
    pub fn principals(&self) -> usize {
        self.principals.map.len()
    }

    /// Forgets the buckets of principals, so that rates changed by a
    /// reload of the tokens take effect at once.
    pub fn reset_principals(&self) {
        self.principals.map.retain(|_, b| {
            b.retired.store(true, Ordering::Release);
            false
        });
    }

    fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn refuse_untracked(&self, rate: Rate) -> Verdict {
        self.refused.mine().fetch_add(1, Ordering::Relaxed);
        Verdict::Refused {
            state: RateState {
                limit: rate.burst.get(),
                remaining: 0,
                reset_secs: 1,
            },
            retry_after_secs: 1,
        }
    }
}

fn bucket(rate: Rate) -> Bucket {
    Bucket {
        rate,
        limiter: RateLimiter::direct(rate.quota()).with_middleware::<StateInformationMiddleware>(),
        last_used: AtomicU64::new(0),
        retired: AtomicBool::new(false),
    }
}

/// Seconds (rounded up) until `missing` requests have been given back.
fn refill_secs(rate: Rate, missing: u32) -> u64 {
    let per = rate.quota().replenish_interval();
    ceil_secs(per * missing)
}

fn ceil_secs(d: Duration) -> u64 {
    let whole = d.as_secs();
    if d.subsec_nanos() > 0 {
        whole + 1
    } else {
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_headers_read_as_their_numbers() {
        for n in [0, 1, 9, 10, 99, 100, 1023, 1024, 86_400, u64::MAX] {
            assert_eq!(number(n).to_str().unwrap(), n.to_string());
        }
    }

    fn rate(text: &str) -> Rate {
        text.parse().unwrap()
    }

    #[test]
    fn rates_parse_as_n_or_n_slash_burst() {
        assert_eq!(rate("5").to_string(), "5/5");
        assert_eq!(rate("5/20").to_string(), "5/20");
        for bad in ["", "0", "5/0", "x", "5/", "-1", "1.5"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_retry_time() {
        let limits = RateLimits::new(Some(rate("1/3")), 10);
        let alice: Arc<str> = "alice".into();
        let mut left = Vec::new();
        for _ in 0..3 {
            match limits.check(&alice, None, None) {
                Verdict::Allowed(q) => {
                    assert_eq!(q.limit, 3);
                    left.push(q.remaining);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(left, [2, 1, 0]);
        match limits.check(&alice, None, None) {
            Verdict::Refused {
                state,
                retry_after_secs,
            } => {
                assert_eq!(state.remaining, 0);
                assert_eq!(retry_after_secs, 1);
                assert_eq!(state.reset_secs, 3);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(limits.refused(), 1);
        // Another principal has a bucket of its own, and its own rate wins.
        let bob: Arc<str> = "bob".into();
        assert!(matches!(
            limits.check(&bob, Some(rate("100")), None),
            Verdict::Allowed(RateState { limit: 100, .. })
        ));
        let unlimited = RateLimits::new(None, 10);
        assert_eq!(unlimited.check(&alice, None, None), Verdict::Unlimited);
    }

    #[test]
    fn anonymous_callers_are_limited_per_address_and_the_map_is_bounded() {
        let limits = RateLimits::new(Some(rate("1/1")), 2);
        let anon: Arc<str> = super::super::auth::ANONYMOUS.into();
        let ip = |n: u8| Some(IpAddr::from([10, 0, 0, n]));
        assert!(matches!(
            limits.check(&anon, None, ip(1)),
            Verdict::Allowed(_)
        ));
        assert!(matches!(
            limits.check(&anon, None, ip(1)),
            Verdict::Refused { .. }
        ));
        assert!(matches!(
            limits.check(&anon, None, ip(2)),
            Verdict::Allowed(_)
        ));
        // Both tracked addresses are recent: a third is refused, not
        // tracked past the bound.
        assert!(matches!(
            limits.check(&anon, None, ip(3)),
            Verdict::Refused { .. }
        ));
        assert_eq!(limits.clients(), (2, 2));
    }

    #[test]
    fn principal_buckets_are_bounded_too() {
        let limits = RateLimits::new(Some(rate("1/1")), 2);
        let name = |n: u8| -> Arc<str> { format!("client-{n}").into() };
        assert!(matches!(
            limits.check(&name(1), None, None),
            Verdict::Allowed(_)
        ));
        assert!(matches!(
            limits.check(&name(2), None, None),
            Verdict::Allowed(_)
        ));
        // A third name while both are recent: refused, not tracked.
        assert!(matches!(
            limits.check(&name(3), None, None),
            Verdict::Refused { .. }
        ));
        assert_eq!(limits.principals(), 2);
        // A known name keeps its bucket (and is refused by it, not by the
        // bound).
        assert!(matches!(
            limits.check(&name(1), None, None),
            Verdict::Refused { .. }
        ));
        assert_eq!(limits.principals(), 2);
    }

    #[test]
    fn a_remembered_bucket_is_dropped_with_its_map_entry() {
        let limits = RateLimits::new(Some(rate("1/1")), 10);
        let alice: Arc<str> = "alice".into();
        assert!(matches!(
            limits.check(&alice, None, None),
            Verdict::Allowed(_)
        ));
        assert!(matches!(
            limits.check(&alice, None, None),
            Verdict::Refused { .. }
        ));
        // A reload forgets the principals' buckets: this thread's memo of
        // alice's must not outlive it.
        limits.reset_principals();
        assert!(matches!(
            limits.check(&alice, None, None),
            Verdict::Allowed(_)
        ));
        // A new rate for alice is a new bucket, not the remembered one.
        assert!(matches!(
            limits.check(&alice, Some(rate("5/5")), None),
            Verdict::Allowed(RateState { limit: 5, .. })
        ));
        // Other limits in the same process have buckets of their own.
        let other = RateLimits::new(Some(rate("1/1")), 10);
        assert!(matches!(
            other.check(&alice, None, None),
            Verdict::Allowed(_)
        ));
        assert_eq!(limits.refused(), 1);
    }
}
