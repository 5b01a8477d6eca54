//! larder: Erlang ETS/DETS-style tables over HTTP/JSON.
//!
//! # Layout
//! Who calls whom:
//!
//! ```text
//! HTTP -> api -> store            (every request)
//!         api -> persist          (a sync write waits for its fsync; table
//!                                  definitions are made durable)
//!         persist -> store        (write-back reads dirty keys and values;
//!                                  recovery loads tables)
//! ```
//!
//! The store never calls the durable tier: it marks what changed, and
//! [`persist`] comes to read it. Nothing below [`api`] knows HTTP; nothing
//! outside [`persist`] names sled.
//!
//! - [`config`]: the command line and environment, one documented struct.
//! - [`app`]: opens the data directory, binds the listener, wires state and
//!   router, recovers, runs until a stop signal and shuts down in order.
//! - [`api`]: one module per resource (tables, entries, counters, service,
//!   metrics); [`api::front`], the one middleware (request id, readiness,
//!   load shedding, timeout, authentication, metrics, logs);
//!   [`api::drain`], which keeps keep-alive connections usable after early
//!   answers; per-table access ([`api::auth`]); the read-through miss path
//!   ([`api::origin`]); extractors that give every malformed request the
//!   same JSON error; and the OpenAPI document. Handlers validate, call the
//!   store, and shape responses. [`error::ApiError`] is the only type that
//!   becomes an error response.
//! - [`store`]: tables of the four ETS types with their exact semantics, the
//!   catalog of tables, TTL sweeping, LRU eviction, memory accounting and
//!   dirty tracking; knows nothing of HTTP or disk.
//! - [`persist`]: the durable tier (sled behind a trait, with real fsyncs),
//!   write-back and group commit, recovery, and the versioned on-disk format.
//! - [`clock`]: time behind a trait so expiry is testable without sleeping.
//! - [`histogram`]: fixed-bucket latency histograms for the metrics.
//! - [`json`]: JSON text as larder accepts it from clients (no repeated
//!   member names).
//! - [`net`]: the listener and its connections: the accept loop, the
//!   connection cap, header and idle timeouts, the 64 KiB head limit, and
//!   connections that close when a client stops taking the bytes of its
//!   response.
//! - [`stripe`]: per-thread copies of values every request updates.
//! - [`pace`]: the rhythm of long work: yield every few milliseconds,
//!   stop before the deadline.

#![warn(missing_docs)]

/// A named point where a test can pause or fail this code (tikv's `fail`
/// crate). Compiled to nothing unless the `failpoints` feature is on, which
/// only the tests turn on.
#[macro_export]
#[doc(hidden)]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}

pub mod api;
pub mod app;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod histogram;
pub mod json;
pub mod net;
pub mod ops;
pub mod pace;
pub mod persist;
pub mod select;
pub mod store;
pub mod stripe;
